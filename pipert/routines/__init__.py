"""Ready-made routines, one module each; every module registers its routines on import.

The registry (``pipert.registry``) imports every module of this package at the
first lookup, so a new module here needs no other change to be found by name.
``_stream`` holds what the frame sources and writers share (message fields, the
end of the stream); ``pipert plugins`` lists the routines with their parameters.
"""
