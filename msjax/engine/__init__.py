"""The device-free engine: requests, sampling parameters, page accounting and continuous batching.

The engine decides what runs each step and hands the runtime one plain `StepBatch`; it never touches a device.
"""
