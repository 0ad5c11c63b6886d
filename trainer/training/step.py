"""One DreamBooth LoRA optimisation step on cached inputs (trainer/training/engine.py runs it in a loop).

Everything a step draws at random is fixed up front by the seed (which photos, mirrored or not, timesteps) or comes
from `noise_generator`, whose state the checkpoint keeps. The step reads its step number and its two noise draws from
static device buffers that `step()` fills first, so the same code runs eagerly and, on CUDA, replayed from a CUDA
graph (trainer/training/graph.py): the replay does the eager step's math (up to rounding on the GPU: docs/TRAINING.md).
"""
from __future__ import annotations

import math
from collections import deque
from contextlib import nullcontext

# A replayed step is one launch, so the host could queue hundreds of steps (seconds of GPU work) ahead of the GPU;
# cancels, yields, slice deadlines and progress are judged on the host, so it waits once this many steps are in
# flight. A member's /imagine waits for the steps in flight when the training yields (two batch-4 steps: ≈ 0.28 s on
# an H200); one keeps the GPU fed all the same, as the host queues a replayed step in a few milliseconds.
MAX_STEPS_IN_FLIGHT = 1


class StepsInFlight:
    """Keeps the host at most MAX_STEPS_IN_FLIGHT steps ahead of a CUDA device (nothing to do elsewhere): call
    `queued()` after queueing each step. Used by the training step and by class images that may pause."""

    def __init__(self, device):
        self._cuda = device.type == "cuda"
        self._events: deque = deque()

    def queued(self) -> None:
        if not self._cuda:
            return
        import torch

        self._events.append(torch.cuda.Event())
        self._events[-1].record()
        if len(self._events) > MAX_STEPS_IN_FLIGHT:
            self._events.popleft().synchronize()


class StepRunner:
    def __init__(self, pipe, job, inputs: dict, class_latents, noise_generator, *, cuda_graphs: bool = True):
        import torch
        from diffusers import DDPMScheduler

        from trainer.models.family import family_of

        spec = job.spec
        self.spec, self.job = spec, job
        self.pipe, self.family = pipe, family_of(pipe)
        self.unet, self.text_encoder = pipe.unet, pipe.text_encoder
        self.text_encoders = dict(zip(self.family.text_encoders, self.family.text_encoder_modules(pipe)))
        self.device, self.dtype = pipe.unet.device, pipe.unet.dtype
        self.generator = noise_generator
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.prediction = self.noise_scheduler.config.prediction_type
        to = dict(device=self.device)
        self.mean, self.std = inputs["mean"].to(**to), inputs["std"].to(**to)
        self.prompt_ids = inputs["prompt_ids"].to(**to)
        self.photo_prompt = inputs["photo_prompt"].to(**to)
        self.embeds = inputs["embeds"].to(self.device, self.dtype) if "embeds" in inputs else None
        self.prior = class_latents is not None
        if self.prior:
            self.class_mean, self.class_std = class_latents[0].to(**to), class_latents[1].to(**to)
        if self.family.extra_conditioning:  # SDXL: the second encoder's ids, pooled embeddings, size conditioning
            self.prompt_ids_2 = inputs["prompt_ids_2"].to(**to)
            self.pooled = inputs["pooled"].to(self.device, self.dtype) if "pooled" in inputs else None
            self.time_ids = inputs["time_ids"].to(**to)
            side = float(job.resolution)  # class images are generated at the training size: no crop
            self.class_time_ids = torch.tensor([[side, side, 0.0, 0.0, side, side]], device=self.device)
        self.plan = {k: v.to(**to) for k, v in self._plan().items()}

        self.unet_params = [p for p in self.unet.parameters() if p.requires_grad]
        self.te_params = ([p for encoder in self.text_encoders.values() for p in encoder.parameters() if p.requires_grad]
                          if spec.train_text_encoder else [])
        groups = [{"params": self.unet_params, "lr": spec.learning_rate}]
        if self.te_params:
            groups.append({"params": self.te_params, "lr": spec.text_encoder_learning_rate})
        self.params = self.unet_params + self.te_params
        cuda = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 and cuda else None
        # The grad scaler syncs with the host (inf checks): it cannot live in a CUDA graph. Checkpointed layers can
        # (their recompute is more kernels in the backward pass; trainer/training/lora_scope.py CHECKPOINT_OPTIONS).
        use_graph = cuda_graphs and cuda and self.scaler is None
        # diffusers' train_dreambooth_lora.py AdamW settings; fused kernels on CUDA (one launch for all params);
        # a graph needs the step count on the device (capturable).
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                                           fused=True if cuda else None, capturable=use_graph)
        # Autocast's cast cache must be off inside a CUDA graph; each weight is cast once per step anyway.
        self.autocast = (torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)
                         if self.dtype in (torch.float16, torch.bfloat16) else nullcontext())
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_count = 0
        width = spec.batch_size * (2 if self.prior else 1)
        shape = (width, *self.mean.shape[2:])
        self._index = torch.zeros(1, dtype=torch.long, device=self.device)
        self._latent_noise = torch.empty(shape, dtype=self.mean.dtype, device=self.device)
        self._noise = torch.empty(shape, dtype=self.mean.dtype, device=self.device)
        self._in_flight = StepsInFlight(self.device)
        self.graph = None
        if use_graph:
            from trainer.training.graph import GraphedStep

            self.graph = GraphedStep(self._compute, lambda: self.optimizer.zero_grad(set_to_none=True))
        self.unet.train()
        if spec.train_text_encoder:
            for encoder in self.text_encoders.values():
                encoder.train()

    def _plan(self) -> dict:
        """Per step: photo indices, mirror flags, class-image indices and timesteps, from the seed alone."""
        import torch

        spec, total, batch = self.spec, self.job.total, self.spec.batch_size
        g = torch.Generator().manual_seed(spec.seed)

        def shuffled_epochs(n: int):  # every photo once per epoch, in a fresh order each epoch
            needed = total * batch
            order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(needed / n))])
            return order[:needed].view(total, batch)

        def flips():
            if not spec.flip:
                return torch.zeros(total, batch, dtype=torch.long)
            return torch.randint(0, 2, (total, batch), generator=g)

        plan = {"photo": shuffled_epochs(self.mean.shape[1]), "photo_flip": flips()}
        if self.prior:
            plan["class"] = shuffled_epochs(self.class_mean.shape[1])
            plan["class_flip"] = flips()
        width = batch * (2 if self.prior else 1)
        plan["timesteps"] = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (total, width),
                                          generator=g)
        return plan

    def step(self, index: int) -> None:
        import torch

        self._index.fill_(index)
        torch.randn(self._latent_noise.shape, generator=self.generator, device=self.device, out=self._latent_noise)
        torch.randn(self._noise.shape, generator=self.generator, device=self.device, out=self._noise)
        if self.graph is not None:
            self.graph()
        else:
            self._compute(True)
        self.loss_count += 1
        self._in_flight.queued()

    def _compute(self, zero_grad: bool) -> None:
        """The step itself, on the static inputs; no host sync (it may run inside a CUDA graph)."""
        import torch
        import torch.nn.functional as F
        from diffusers.training_utils import compute_snr

        plan, batch = self.plan, self.spec.batch_size

        def now(name):
            return plan[name].index_select(0, self._index)[0]

        photo, photo_flip = now("photo"), now("photo_flip")
        mean, std = self.mean[photo_flip, photo], self.std[photo_flip, photo]
        prompt = self.photo_prompt[photo]
        if self.prior:
            cls, cls_flip = now("class"), now("class_flip")
            mean = torch.cat([mean, self.class_mean[cls_flip, cls]])
            std = torch.cat([std, self.class_std[cls_flip, cls]])
            prompt = torch.cat([prompt, torch.full_like(prompt, len(self.job.prompts) - 1)])
        timesteps = now("timesteps")
        latents = mean + std * self._latent_noise
        noise = self._noise
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)

        with self.autocast:
            if self.family.extra_conditioning:
                pred = self._sdxl_prediction(noisy, timesteps, prompt, photo)
            else:
                if self.embeds is not None:
                    embeds = self.embeds[prompt]
                else:
                    embeds = self.text_encoder(self.prompt_ids[prompt])[0]
                pred = self.unet(noisy.to(self.dtype), timesteps, embeds.to(self.dtype)).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.spec.snr_gamma:
            # Min-SNR weighting (Hang et al. 2023), as diffusers' training scripts apply it.
            snr = compute_snr(self.noise_scheduler, timesteps)
            weight = torch.clamp(snr, max=self.spec.snr_gamma)
            per_sample = per_sample * (weight / snr if self.prediction == "epsilon" else weight / (snr + 1))
        loss = per_sample[:batch].mean()
        if self.prior:
            loss = loss + self.spec.prior_loss_weight * per_sample[batch:].mean()

        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        self.loss_sum += loss.detach()

    def _sdxl_prediction(self, noisy, timesteps, prompt, photo):
        """SDXL's UNet call: both encoders' hidden states, the pooled embedding and the size conditioning."""
        import torch

        from trainer.models.family import encode_prompt_ids

        if self.embeds is not None:
            embeds, pooled = self.embeds[prompt], self.pooled[prompt]
        else:
            embeds, pooled = encode_prompt_ids(self.pipe, self.family,
                                               [self.prompt_ids[prompt], self.prompt_ids_2[prompt]], grad=True)
        time_ids = self.time_ids[photo]
        if self.prior:
            time_ids = torch.cat([time_ids, self.class_time_ids.expand(len(photo), -1)])
        added = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.to(self.dtype)}
        return self.unet(noisy.to(self.dtype), timesteps, embeds.to(self.dtype), added_cond_kwargs=added).sample

    @property
    def graph_replays(self) -> int:
        return self.graph.replays if self.graph is not None else 0

    def take_mean_loss(self) -> float | None:
        if not self.loss_count:
            return None
        value = (self.loss_sum / self.loss_count).item()
        self.loss_sum.zero_()
        self.loss_count = 0
        return value

    def _named_trainables(self) -> dict:
        named = {f"unet.{n}": p for n, p in self.unet.named_parameters() if p.requires_grad}
        if self.te_params:
            for component, encoder in self.text_encoders.items():
                named.update({f"{component}.{n}": p for n, p in encoder.named_parameters() if p.requires_grad})
        return named

    def state_dict(self, *, on_device: bool = False) -> dict:
        """on_device: the LoRA weights as the live tensors, for a caller that clones them (periodic_checkpoint.py)."""
        state = {"lora": {n: p.detach() if on_device else p.detach().cpu().clone()
                          for n, p in self._named_trainables().items()},
                 "optimizer": self.optimizer.state_dict(),
                 "noise_rng": self.generator.get_state()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state(self, state: dict) -> None:
        """Before the first step only (a captured graph would keep pointing at the replaced optimiser state)."""
        import torch

        named = self._named_trainables()
        if set(named) != set(state["lora"]):
            raise RuntimeError("the checkpoint's LoRA layout does not match this training")
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(state["lora"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["noise_rng"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def close(self) -> None:
        """Free the captured graph (its pool holds the step's activations) as soon as the training ends."""
        if self.graph is not None:
            self.graph.close()
