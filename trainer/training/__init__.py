"""DreamBooth LoRA training on the shared resident pipeline, in resumable slices: the engine (TrainSpec,
train_concept), its inputs (photos, class images, cached latents), the optimisation step and its CUDA-graph replay,
checkpoints and the LoRA files it writes. docs/TRAINING.md explains the recipe."""
