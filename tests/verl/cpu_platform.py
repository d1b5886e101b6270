"""A test-only CPU platform for verl (verl 0.9.1 has none: on a machine without a GPU it falls back to `nvidia` and
fails). Registered as `cpu`; select it with VERL_PLATFORM=cpu before verl first asks for its platform. Not part of
the plugin: the plugin never changes how verl picks its device."""

from __future__ import annotations

import contextlib
import os
from types import ModuleType

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry


class _CPUDeviceModule(ModuleType):
    """`torch.cpu` plus stand-ins for the CUDA-only calls verl makes on its device module (memory stats are 0)."""

    _STANDINS = {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "get_device_name": lambda *a: "cpu",
        "mem_get_info": lambda *a: (0, 0),
        "get_rng_state": lambda *a: torch.get_rng_state(),
        "set_rng_state": lambda state, *a: torch.set_rng_state(state),
    }

    def __getattr__(self, name: str):
        if name in self._STANDINS:
            return self._STANDINS[name]
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: 0  # empty_cache, memory_reserved, ipc_collect, set_per_process_memory_fraction, ...


_CPU_DEVICE = _CPUDeviceModule("synapo_cpu_device")


@PlatformRegistry.register(platform="cpu")
class PlatformCPU(PlatformBase):
    device_name = "cpu"
    vendor_name = "nvidia"  # so verl's engine lookup (device, vendor) finds the cuda/nvidia registrations

    @property
    def device_module(self) -> ModuleType:
        return _CPU_DEVICE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        return os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"  # never auto-detected over a GPU

    def current_device(self):
        return "cpu"  # used as `.to(get_device_id())`

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        pass

    def synchronize(self, device_index=None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "GPU"  # a logical GPU for Ray's scheduler (`+ray_kwargs.ray_init.num_gpus=1`), never touched

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None
