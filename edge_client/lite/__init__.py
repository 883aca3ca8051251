"""A torch-free training runtime for the edge client (``--runtime lite``): the shipped models' layers, the
local objective (FedAvg, FedProx, FedGen) and evaluation in vectorised numpy, float32, held to the torch
runtime by tests/edge/. Modules: `layers` (forward / backward math), `model` (the shipped models on torch's
state-dict names), `local` (one local update, evaluation), `runtime` (`LiteRuntime`, the `edge_client.runtime` seam).
"""
