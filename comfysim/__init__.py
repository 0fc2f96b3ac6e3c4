"""
comfysim: a ComfyUI server simulator (HTTP + websocket protocol of ComfyUI 0.3.64, real PNG files, fault
injection), usable without Django and without a GPU. See README.md beside this file.
"""

from comfysim.server import Simulator
from comfysim.thread import SimulatorThread

__all__ = ["Simulator", "SimulatorThread"]
