"""Continuous batching: the scheduler decides, the model runner runs, the engine core's thread drives both."""
