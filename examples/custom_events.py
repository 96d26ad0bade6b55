"""Custom events: handlers with parameters, the three ways to target them, and an event that a
routine sends by itself. Runs for about three seconds: ``python examples/custom_events.py``.

Flow ``sensors`` holds two thermometers, flow ``alarms`` one alarm that both feed. When a
thermometer reads over the alarm's limit, the alarm tells that thermometer to recalibrate.
Routines log what their handlers do (stderr, ``pipe.<flow>.<routine>: ...``); the script
prints each event's acknowledgement (stdout).
"""
import random
import time

from pipert import DestinationRoutine, EventError, Pipe, SourceRoutine, Wire, events


class Thermometer(SourceRoutine):
    """Reads 20 degrees (plus a little noise and its calibration offset) 20 times a second."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.offset = 0.0
        self.set_const_fps(20)

    def main_logic(self) -> dict:
        return {"sensor": self.name, "celsius": 20.0 + self.offset + random.uniform(-0.2, 0.2)}

    @events("CALIBRATE")
    def calibrate(self, offset: float) -> None:
        """Parameters of an event arrive as keyword arguments of its handler."""
        self.offset = offset
        self.logger.info("offset now %s", offset)

    @events("REPORT")
    def report(self) -> None:
        self.logger.info("offset %s", self.offset)


class Alarm(DestinationRoutine):
    """Watches the readings; over ``limit`` it asks that thermometer to recalibrate (once)."""

    def __init__(self, limit: float, name: str = "alarm") -> None:
        super().__init__(name)
        self.limit = limit
        self.asked = set()

    def main_logic(self, data: dict) -> None:
        sensor = data["sensor"]
        if data["celsius"] <= self.limit:
            self.asked.discard(sensor)
        elif sensor not in self.asked:
            self.asked.add(sensor)
            self.logger.info("%s reads %.0f C, over %s C: asking it to recalibrate", sensor, data["celsius"],
                             self.limit)
            self.notify_event("CALIBRATE", {"sensors": [sensor]}, offset=0.0)  # from inside a routine

    @events("REPORT")
    def report(self) -> None:
        self.logger.info("limit %s C", self.limit)


def main() -> None:
    pipe = Pipe()
    t1, t2, alarm = Thermometer("t1"), Thermometer("t2"), Alarm(limit=40.0)
    pipe.create_flow("sensors", False, t1, t2)
    pipe.create_flow("alarms", False, alarm)
    pipe.link(Wire(source=t1, destinations=(alarm,)), Wire(source=t2, destinations=(alarm,)))
    pipe.build()
    pipe.notify_event("start")

    # 1. No targets: every routine that handles the event.
    print("REPORT to all:", pipe.notify_event("REPORT").wait(5))
    # 2. {flow: []}: every routine of a flow.
    print("CALIBRATE flow sensors:", pipe.notify_event("CALIBRATE", {"sensors": []}, offset=1.5).wait(5))
    # 3. {flow: [routine, ...]}: chosen routines. t2 goes over the limit; the alarm resets it.
    print("CALIBRATE t2:", pipe.notify_event("CALIBRATE", {"sensors": ["t2"]}, offset=30.0).wait(5))
    time.sleep(1.0)
    print("REPORT to all:", pipe.notify_event("REPORT").wait(5))
    # Unknown routines and parameters that fit no handler are refused at once.
    for targets, params in (({"sensors": ["t9"]}, {"offset": 1.0}), ({"sensors": ["t1"]}, {"degrees": 1.0})):
        try:
            pipe.notify_event("CALIBRATE", targets, **params)
        except (EventError, TypeError) as exc:
            print(f"refused: {exc}")
    time.sleep(0.5)
    pipe.join(to_kill=True)
    print("done")


if __name__ == "__main__":
    main()
