"""Packaging for pipert.

The distribution is called ``pipert-daemon`` so that it can be installed next to
PipeRT 2 (distributed as ``PipeRT``, imported as ``pipert2``) for benchmarks.
"""
from setuptools import find_packages, setup

setup(
    name="pipert-daemon",
    version="0.1.0",
    description="Real-time pipeline daemon for video and sensor analytics",
    packages=find_packages(include=["pipert", "pipert.*"]),
    package_data={"pipert": ["static/*"]},  # the dashboard's page, script and style
    python_requires=">=3.9",
    install_requires=[
        "numpy",
        "posix-ipc",
        "zerorpc",
        "gevent",
        "opencv-python-headless",
        "python-dotenv",
        "python-socketio[client]",
        "PyYAML",
        "prometheus-client",
        "mcap",
        "mcap-protobuf-support",
        "foxglove-schemas-protobuf",
    ],
    extras_require={
        "ray": ["ray>=2.40"],
        "test": ["pytest", "pytest-timeout", "playwright", "ray>=2.40", "wheel"],
    },
    entry_points={"console_scripts": ["pipert=pipert.cli:main"]},
)
