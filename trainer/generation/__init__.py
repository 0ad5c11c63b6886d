"""/imagine on the resident pipeline: GenerationService (single and batched requests), LoRAs folded or slotted per
row, CUDA-graph UNet steps, samplers, previews, the safety filter and PNG files with their A1111 parameters."""
