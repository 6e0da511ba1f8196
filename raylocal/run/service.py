"""The run's model service on Ray: ``RunService`` (a thin shell around
``ModelService``) in an actor of its own placement group (reserved until the
parts have trained; a fine-tune on Ray Train or DDP takes its place), or in the
caller's process when the caller already holds a bundle (a Tune trial, a
benchmark's cell); ``ServiceHandle`` starts and releases it."""

from __future__ import annotations

import importlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raylocal.cluster.handle import InProcess
from raylocal.cluster.placement import PartBundles, actor_device
from raylocal.core.config import RaylocalConfig
from raylocal.core.data import ImageData, NodeImages, training_images
from raylocal.run.finish import finish_after_parts
from raylocal.training.schedules import PartsResult
from raylocal.training.service import ModelService, assembled


def here(device: str) -> dict[str, Any]:
    """Where this process is: Ray node, host, pid and the device it computes on."""
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"node_id": node, "host": socket.gethostname(), "pid": os.getpid(), "device": device}


def _import_all(modules: list[str]) -> None:
    for name in modules:
        importlib.import_module(name)


class RunService:
    """A thin shell around ``ModelService`` that also finishes runs whose
    fine-tune is not a single Ray Train worker's (none, or DDP). The async run
    holds it as an actor (``ServiceActor``), or in the caller's own process
    (``InProcess``) when the caller already holds a bundle: a Tune trial, a
    benchmark's cell."""

    def __init__(
        self,
        config_json: str,
        image_shape: tuple[int, int, int],
        threads: int,
        prefetch: bool = True,
        device: str | None = None,
    ) -> None:
        torch.set_num_threads(threads)
        self.config = RaylocalConfig.model_validate_json(config_json)
        # an actor's (a Tune trial's) device is the one Ray granted it; a driver's is the config's
        device = device or str(actor_device(self.config))
        self.service = ModelService(self.config, image_shape, device)
        self.evaluations, self.evaluation_s = 0, 0.0
        if prefetch:
            # what finishing a run needs (seconds of imports), loaded while the parts
            # train: on a thread, so that planning the parts does not wait for it
            modules = ["torch.utils.tensorboard"] + (["torchvision.utils"] if self.config.run.samples else [])
            threading.Thread(target=_import_all, args=(modules,), daemon=True).start()

    def where(self) -> dict[str, Any]:
        return here(str(self.service.device)) | {"evaluations": self.evaluations, "evaluation_s": self.evaluation_s}

    def plan(self, train_images: torch.Tensor | NodeImages) -> dict[str, Any]:
        return self.service.plan(training_images(train_images))

    def evaluate(self, test_images: torch.Tensor, *weights: dict[str, torch.Tensor]) -> float:
        state: dict[str, torch.Tensor] = {}
        for w in weights:  # one dict per part
            state.update(w)
        start = time.perf_counter()
        bpd = self.service.evaluate(test_images, state)
        self.evaluations += 1
        self.evaluation_s += time.perf_counter() - start
        return bpd

    def evaluate_parts(self, test_images: torch.Tensor, bounds: list, states: list[dict[str, Any]]) -> float:
        """Test BPD of the model assembled from part checkpoints (what PBT copies)."""
        return self.evaluate(test_images, assembled(states, self.service.glow, bounds))

    def finish(
        self,
        name: str,
        train: torch.Tensor | NodeImages,
        test: torch.Tensor,
        run_dir: str,
        bounds: list,
        parts: PartsResult | None,
        finetuned: Any = None,
    ) -> dict[str, Any]:
        data = ImageData(name, training_images(train), test)
        device = str(self.service.device)
        summary = finish_after_parts(self.config, data, Path(run_dir), bounds, finetuned, parts, device=device)
        return summary | {"where_finished": self.where() | {"phase": "model service"}}


ServiceActor = ray.remote(RunService)


class ServiceHandle:
    """The run's model service, started (again, after a DDP fine-tune took the
    cluster) and released: an actor in a placement group of its own, or a
    ``RunService`` in this process when ``local`` holds the run's images (the
    caller holds a bundle; one thread, and no second copy of the images).
    ``actor`` is what the run calls it through."""

    def __init__(
        self,
        config_json: str,
        shape: tuple[int, int, int],
        bundles: PartBundles,
        threads: int,
        local: ImageData | None,
        driver_device: str,
    ) -> None:
        self.config_json, self.shape, self.bundles, self.threads = config_json, shape, bundles, threads
        self.local, self.driver_device = local, driver_device
        self.actor: Any = None
        self.pg: PlacementGroup | None = None

    def start(self) -> Any:
        if self.local is not None:
            # an actor's (a Tune trial's) device is the one Ray granted it; a driver's is the config's
            in_actor = ray.get_runtime_context().get_actor_id() is not None
            device = None if in_actor else self.driver_device
            self.actor = InProcess(RunService(self.config_json, self.shape, 1, False, device))
            return self.actor
        bundle = self.bundles.service
        self.pg = self.bundles.reserve_service()
        self.actor = ServiceActor.options(
            num_cpus=bundle["CPU"],
            num_gpus=bundle.get("GPU", 0),
            resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0),
            **self.bundles.shown_gpus(bundle.get("GPU", 0)),
        ).remote(self.config_json, self.shape, self.threads)
        return self.actor

    def images(self, refs: tuple[Any, Any]) -> tuple[Any, Any]:
        """The images as the service takes them: by reference in an actor, this
        process's own tensors when it serves here."""
        return (self.local.train, self.local.test) if self.local is not None else refs

    def release(self) -> None:
        if self.actor is not None and self.local is None:
            ray.kill(self.actor)
        self.actor = None
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
