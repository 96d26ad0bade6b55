"""Control a running pipert daemon from Python over zerorpc, as in the PipeRT README.

Run any pipe as a daemon, e.g. the demo:

    pipert run examples/video_analytics.yaml --rpc

and in another terminal:

    python examples/rpc_client.py [tcp://HOST:PORT] [--kill]

The endpoint defaults to $PIPERT_RPC_ENDPOINT, else tcp://127.0.0.1:4242. If the
daemon requires a token, set PIPERT_TOKEN (in the environment or .env). With
``--kill`` the client ends the pipeline, and with it the daemon. The same calls
from a shell: ``pipert zerorpc tcp://127.0.0.1:4242 execute start``.
"""
import os
import sys

import dotenv
import zerorpc

from pipert.rpc import SendToken


def main() -> None:
    dotenv.load_dotenv(dotenv.find_dotenv(usecwd=True))
    args = [arg for arg in sys.argv[1:] if arg != "--kill"]
    endpoint = args[0] if args else os.environ.get("PIPERT_RPC_ENDPOINT", "tcp://127.0.0.1:4242")
    context = zerorpc.Context()
    if os.environ.get("PIPERT_TOKEN"):
        context.register_middleware(SendToken(os.environ["PIPERT_TOKEN"]))
    client = zerorpc.Client(context=context)
    client.connect(endpoint)

    structure = client.structure()
    for routine in structure["Routines"]:
        print(f"routine {routine['routine_name']} in flow {routine['flow_name']}, events {routine['events']}")
    print("start ->", client.start())  # every event call returns once the handlers ran
    first_flow = structure["Routines"][0]["flow_name"]
    print(f"stop {first_flow} ->", client.execute("stop", {"flows": [first_flow]}))  # or '{"flows": [...]}'
    print(f"start {first_flow} ->", client.execute("start", '{"flows": ["%s"]}' % first_flow))
    try:
        client.execute("NO_SUCH_EVENT", '{"value": 1}')
    except zerorpc.RemoteError as refused:  # bad input is refused and changes nothing
        print("refused:", refused.msg)
    for name, routine in client.status()["routines"].items():
        print(f"{name}: {routine['state']}, in {routine['messages_in']}, out {routine['messages_out']}, "
              f"{routine['fps']} fps")
    if "--kill" in sys.argv[1:]:
        print("join ->", client.join('{"to_kill": true}'))  # returns once every flow has exited
    client.close()


if __name__ == "__main__":
    main()
