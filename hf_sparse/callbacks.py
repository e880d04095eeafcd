"""Trainer callbacks: the DAM search (SparseBERT stage 1) driven by ``transformers.Trainer``.

Schedules are pure functions of the global step, so a run resumed from a Trainer checkpoint recomputes exactly
the temperature and λ an uninterrupted run would have (the gate logits, optimizer and RNG come back with the
checkpoint). Under ``accelerate launch`` every process holds the same gates: they are ordinary parameters whose
gradients DDP averages; the callback only reads them and sets two floats.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .checks import check_int, check_number
from .dam import DAMGates

SCHEDULES = ("constant", "linear", "cosine")
# Trainer.get_decay_parameter_names' rule (transformers 5): these names get no weight decay.
TRAINER_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def schedule_value(kind: str, start: float, end: float | None, progress: float) -> float:
    """Value at ``progress`` ∈ [0, 1] of a schedule from ``start`` to ``end``."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; valid: {', '.join(SCHEDULES)}")
    if kind == "constant" or end is None:
        return start
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return start + (end - start) * progress
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _unwrap(model):
    return getattr(model, "module", model)  # DDP keeps the model in .module


def dam_gates(model) -> DAMGates:
    """The DAM gates of a SparseBERT model (any head), refusing models without an active search."""
    base = getattr(_unwrap(model), "base_model", None)
    gates = getattr(base, "dam", None)
    if not isinstance(gates, DAMGates):
        raise ValueError("DAMCallback needs a SparseBERT model built with a `dam` config; this model has none")
    return gates


class DAMCallback(TrainerCallback):
    """Runs SparseBERT's DAM search inside a Trainer run, and freezes the learned mask at the end.

    Args:
        temperature, final_temperature, temperature_schedule: Gumbel temperature τ from ``temperature`` (default:
            the dam config's, the reference's constant 1.0) to ``final_temperature`` (constant, linear or cosine).
        penalty, final_penalty, penalty_schedule: λ, likewise (default: the dam config's ``penalty``).
        gate_learning_rate: learning rate of the gate logits' own optimizer group (default: the run's).
        target_sparsity: stop training once the model drops at least this fraction of all pairs (pattern ∩ the
            deterministic DAM mask; ``SparseBertModel.dam_density``), the pattern's own drops included.
        density_length: sequence length at which densities are logged and the target is checked (default: the
            dam ``max_length``); set it to the training length when gates beyond it never see data.
        freeze_at_end: call ``model.freeze_dam()`` when training ends (stage 2 then uses the frozen mask).
        log_heads: also log the density of every (gate group, head).

    Next to Trainer's ``loss`` (the optimised task loss + λ·penalty), every log holds its two parts,
    ``dam_task_loss`` and ``dam_penalty_loss`` (λ·penalty), averaged over the same steps.
    """

    def __init__(
        self,
        temperature: float | None = None,
        final_temperature: float | None = None,
        temperature_schedule: str = "constant",
        penalty: float | None = None,
        final_penalty: float | None = None,
        penalty_schedule: str = "constant",
        gate_learning_rate: float | None = None,
        target_sparsity: float | None = None,
        density_length: int | None = None,
        freeze_at_end: bool = True,
        log_heads: bool = True,
    ):
        for kind in (temperature_schedule, penalty_schedule):
            schedule_value(kind, 1.0, 1.0, 0.0)  # validates the name
        for name, value in (("temperature", temperature), ("final_temperature", final_temperature)):
            if value is not None:  # τ = 0 divides the gate logits by zero: NaN gradients
                check_number(f"DAMCallback {name}", value, above=0, why="τ of the Gumbel-sigmoid")
        for name, value in (("penalty", penalty), ("final_penalty", final_penalty)):
            if value is not None:
                check_number(f"DAMCallback {name}", value, at_least=0, why="λ of the L1 penalty")
        if gate_learning_rate is not None:  # 0 would silently fall back to the run's learning rate
            check_number("DAMCallback gate_learning_rate", gate_learning_rate, above=0, why="None: the run's")
        if target_sparsity is not None:
            check_number("DAMCallback target_sparsity", target_sparsity, above=0)
            if not target_sparsity < 1.0:
                raise ValueError(f"target_sparsity must be in (0, 1), got {target_sparsity}")
        if density_length is not None:
            check_int("DAMCallback density_length", density_length, at_least=1)
        self.temperature = (temperature, final_temperature, temperature_schedule)
        self.penalty = (penalty, final_penalty, penalty_schedule)
        self.gate_learning_rate = gate_learning_rate
        self.target_sparsity = target_sparsity
        self.density_length = density_length
        self.freeze_at_end = freeze_at_end
        self.log_heads = log_heads
        self._config_values: tuple[float, float] | None = None
        self._hook = None
        self._loss_parts = None  # (task loss, λ·penalty) summed over the training forwards since the last log
        self._forwards = 0

    # -- optimizer ---------------------------------------------------------------------------------------------
    def gate_lr(self, args: TrainingArguments) -> float:
        """The gates' learning rate: ``gate_learning_rate``, or the run's when it is None."""
        return args.learning_rate if self.gate_learning_rate is None else self.gate_learning_rate

    def optimizer_cls_and_kwargs(self, model, args: TrainingArguments):
        """For ``Trainer(optimizer_cls_and_kwargs=...)``: AdamW with the gate logits in their own group.

        Groups: Trainer's usual decay / no-decay split of the other parameters, and the gates with weight decay 0
        and ``gate_learning_rate``. Built when the Trainer builds its optimizer, so checkpoints resume as usual.
        """
        from transformers.trainer_pt_utils import get_parameter_names

        gates = dam_gates(model).logits
        decay = set(get_parameter_names(model, [torch.nn.LayerNorm], TRAINER_NO_DECAY_PATTERNS))
        others = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p is not gates]
        groups = [
            {"params": [p for n, p in others if n in decay], "weight_decay": args.weight_decay},
            {"params": [p for n, p in others if n not in decay], "weight_decay": 0.0},
            {"params": [gates], "weight_decay": 0.0, "lr": self.gate_lr(args)},
        ]
        kwargs = {
            "params": groups,
            "lr": args.learning_rate,
            "betas": (args.adam_beta1, args.adam_beta2),
            "eps": args.adam_epsilon,
        }
        return torch.optim.AdamW, kwargs

    def _check_optimizer(self, optimizer, gates: DAMGates, args: TrainingArguments) -> None:
        for group in optimizer.param_groups:
            if any(p is gates.logits for p in group["params"]):
                decay = group.get("weight_decay", 0.0)
                lr = group.get("initial_lr", group["lr"])
                wanted_lr = self.gate_lr(args)
                if decay != 0.0 or not math.isclose(lr, wanted_lr):
                    raise ValueError(
                        f"the DAM gate logits are in an optimizer group with weight_decay={decay}, lr={lr}; they "
                        f"need weight_decay=0 and lr={wanted_lr}. Build the Trainer with "
                        "optimizer_cls_and_kwargs=dam_callback.optimizer_cls_and_kwargs(model, args)"
                    )
                return
        raise ValueError("the DAM gate logits are not in the optimizer: they would never be trained")

    # -- schedules ---------------------------------------------------------------------------------------------
    def values_at(self, state: TrainerState, gates: DAMGates) -> tuple[float, float]:
        """(τ, λ) at the state's global step."""
        if self._config_values is None:
            self._config_values = (float(gates.settings["temperature"]), float(gates.settings["penalty"]))
        progress = state.global_step / max(state.max_steps, 1)
        t_start, t_end, t_kind = self.temperature
        p_start, p_end, p_kind = self.penalty
        tau = schedule_value(t_kind, self._config_values[0] if t_start is None else t_start, t_end, progress)
        lam = schedule_value(p_kind, self._config_values[1] if p_start is None else p_start, p_end, progress)
        return tau, lam

    def _apply(self, state: TrainerState, model) -> DAMGates:
        gates = dam_gates(model)
        gates.temperature, gates.penalty_weight = self.values_at(state, gates)
        return gates

    def density(self, model, inside_pattern: bool = False) -> torch.Tensor:
        """What the model keeps per (gate group, head) at ``density_length``: ``SparseBertModel.dam_density``
        (the deterministic mask while searching, the stored one once frozen)."""
        base = _unwrap(model).base_model
        return base.dam_density(self.density_length or dam_gates(model).max_length, inside_pattern)

    # -- the logged loss, in its two parts ----------------------------------------------------------------------
    def _record_loss_parts(self, module, args, output) -> None:
        """Forward hook: the optimised loss of a training forward is task loss + λ·penalty; keep both parts.

        Trainer logs only their sum, which rises while λ ramps up even as the task loss falls; ``on_log`` adds
        the two parts, averaged over the same forwards as Trainer's ``loss``, so they add up to it.
        """
        loss, penalty = getattr(output, "loss", None), getattr(output, "dam_penalty", None)
        if not module.training or loss is None or penalty is None or not module.base_model.dam_searching():
            return
        weighted = dam_gates(module).penalty_weight * penalty.detach().float()
        parts = torch.stack([loss.detach().float() - weighted, weighted])
        self._loss_parts = parts if self._loss_parts is None else self._loss_parts + parts
        self._forwards += 1

    def _mean_loss_parts(self) -> tuple[float, float] | None:
        """Task loss and λ·penalty averaged over the forwards since the last call (over every process)."""
        parts = self._loss_parts
        if parts is None:
            return None
        totals = torch.cat([parts, parts.new_tensor([self._forwards])])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)  # Trainer's logged loss is the mean over processes too
        self._loss_parts, self._forwards = None, 0
        task, weighted = (totals[:2] / totals[2]).tolist()
        return task, weighted

    # -- events ------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not _unwrap(model).base_model.dam_searching():
            raise ValueError(
                "DAMCallback needs an unfrozen DAM (config.dam['frozen'] is True): this model already has its "
                "learned mask; train it without DAMCallback (stage 2)"
            )
        gates = self._apply(state, model)
        if optimizer is not None:
            self._check_optimizer(optimizer, gates, args)
        if self._hook is None:
            self._hook = _unwrap(model).register_forward_hook(self._record_loss_parts)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_step_end(self, args, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if self.target_sparsity is not None and 1.0 - self.density(model).mean().item() >= self.target_sparsity:
            control.should_training_stop = True

    def on_log(self, args, state: TrainerState, control, logs=None, model=None, **kwargs):
        if logs is None or not _unwrap(model).base_model.dam_searching():
            return
        gates = dam_gates(model)
        per_head = self.density(model)
        extra = {}
        parts = self._mean_loss_parts() if "loss" in logs else None  # a training-loss log (not eval, not summary)
        if parts is not None:
            extra.update({"dam_task_loss": parts[0], "dam_penalty_loss": parts[1]})
        extra |= {
            "dam_temperature": gates.temperature,
            "dam_lambda": gates.penalty_weight,
            "dam_density": round(per_head.mean().item(), 5),
            "dam_density_inside_pattern": round(self.density(model, inside_pattern=True).mean().item(), 5),
        }
        if self.log_heads:
            for g, row in enumerate(per_head.tolist()):
                label = "shared" if gates.groups == 1 else f"layer{g}"
                extra.update({f"dam_density_{label}_head{h}": round(v, 5) for h, v in enumerate(row)})
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook, self._loss_parts, self._forwards = None, None, 0
        base = _unwrap(model)
        if self.freeze_at_end and base.base_model.dam_searching():
            base.freeze_dam()


class SparsefinderCallback(TrainerCallback):
    """Fits a model's Sparsefinder predictors inside a Trainer run: at the end of training, and optionally every
    ``every_n_evaluations`` evaluations, on ``dataloader`` (batches the model's forward accepts).

    Fitting reads the model's attention and changes only predictor state, never the weights Trainer trains.
    With several processes, process 0 fits and broadcasts the predictor state, so every rank ends identical.
    """

    def __init__(self, dataloader, every_n_evaluations: int | None = None, **fit_kwargs):
        if every_n_evaluations is not None and every_n_evaluations < 1:
            raise ValueError(f"every_n_evaluations must be None or >= 1, got {every_n_evaluations}")
        self.dataloader = dataloader
        self.every_n_evaluations = every_n_evaluations
        self.fit_kwargs = fit_kwargs
        self.evaluations = 0
        self.losses: dict[int, list[float]] = {}

    def _fit(self, args: TrainingArguments, model) -> None:
        from .sparsefinder_fit import fit

        model = _unwrap(model)
        if args.process_index == 0:
            self.losses = fit(model, self.dataloader, progress=not args.disable_tqdm, **self.fit_kwargs)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for module in model.sparsefinder_modules().values():
                for tensor in [*module.sparsefinder.parameters(), *module.sparsefinder.buffers()]:
                    torch.distributed.broadcast(tensor.data, src=0)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.evaluations += 1
        if self.every_n_evaluations and self.evaluations % self.every_n_evaluations == 0:
            self._fit(args, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._fit(args, model)
