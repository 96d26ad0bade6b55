"""The README example, exactly as written there."""
from pipert import Pipe, Wire, SourceRoutine, MiddleRoutine, DestinationRoutine, events
from pipert import START_EVENT_NAME, STOP_EVENT_NAME, KILL_EVENT_NAME

class GenerateData(SourceRoutine):
    def main_logic(self) -> dict:
        return {"value": "example"}

class PrintResult(DestinationRoutine):
    def main_logic(self, data: dict) -> None:
        print(data["value"])

pipe = Pipe()
pipe.create_flow("example_flow", True, GenerateData(), PrintResult())   # auto_wire=True
pipe.build()
pipe.notify_event(START_EVENT_NAME)
pipe.notify_event("CUSTOM", {"example_flow": ["GenerateData-0"]}, param=1)
pipe.join(to_kill=True)
