"""Routines for examples/sensors.yaml: a simulated temperature sensor, an alarm threshold, a log.

Registered by name with ``@pipert.register``; the pipeline file refers to them as
``sensors:Sensor`` (the module next to the file), which also registers their names.
Run it with ``pipert run examples/sensors.yaml --start --api``, then change the
threshold while it runs::

    curl -X POST localhost:4000/routines/alarm/params -d '{"limit": 22.5}'
"""
import math
import random
import time

import pipert
from pipert import DestinationRoutine, MiddleRoutine, Param, SourceRoutine


@pipert.register("example-sensor")
class Sensor(SourceRoutine):
    """Reads a temperature that drifts around ``mean``, ``fps`` times a second."""

    fps = Param(float, default=5.0, min=0.1, max=1000, help="readings a second")
    mean = Param(float, default=21.0, help="the temperature it drifts around, in C")

    def setup(self) -> None:
        self.n = 0

    def main_logic(self) -> dict:
        time.sleep(1.0 / self.fps)
        self.n += 1
        return {"n": self.n, "sensor": self.name,
                "celsius": round(self.mean + 2 * math.sin(self.n / 10) + random.uniform(-0.3, 0.3), 2)}


@pipert.register("example-threshold")
class Threshold(MiddleRoutine):
    """Passes on the readings over ``limit`` (all of them with ``report_all``)."""

    limit = Param(float, default=22.0, help="alarm above this temperature, in C")
    report_all = Param(bool, default=False, help="pass every reading on, marked alarm true/false")

    def params_changed(self, changed: dict) -> None:
        self.logger.info("alarm limit now %.1f C", self.limit)

    def main_logic(self, data: dict):
        alarm = data["celsius"] > self.limit
        return dict(data, alarm=alarm, limit=self.limit) if alarm or self.report_all else None


@pipert.register("example-log")
class Log(DestinationRoutine):
    """Logs what reaches it, with ``prefix``."""

    prefix = Param(str, default="reading", help="the first word of each line")

    def main_logic(self, data: dict) -> None:
        self.logger.info("%s: %s", self.prefix, data)
