"""The KL coefficient β of the PPO reward, fixed or adapted towards a target KL; its value lives on the device."""

from __future__ import annotations

import torch


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, kl_coef: float, device: torch.device):
        self.value = torch.tensor(float(kl_coef), device=device)

    def update(self, current_kl: torch.Tensor, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict) -> None:
        self.value.fill_(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n / horizon), on the device."""

    def __init__(self, kl_coef: float, target: float, horizon: int, device: torch.device):
        super().__init__(kl_coef, device)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: torch.Tensor, n_steps: int) -> None:
        proportional_error = torch.clamp(current_kl / self.target - 1.0, -0.2, 0.2)
        self.value.mul_(1.0 + proportional_error * (n_steps / self.horizon))


__all__ = ["AdaptiveKLController", "FixedKLController"]
