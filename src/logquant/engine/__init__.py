"""The bit-exact, multiplier-free integer inference engine for .lqz networks.

It reads only the .lqz file (and the number formats): ``Engine(logquant.lqz.load(path))``.
"""

from logquant.engine.engine import Engine, EngineResult

__all__ = ["Engine", "EngineResult"]
