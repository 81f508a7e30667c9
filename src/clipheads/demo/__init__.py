"""The main job: the whole clipheads pipeline on the bundled model and world (``clipheads demo``)."""

from clipheads.demo.pipeline import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
