"""`rlhf-fast sft | rm | ppo`: validate every data file, then load the weights and train.

Order of work, so that a mistake costs seconds rather than a model load: paths and config first, then the
tokenizer (no weights), then every data file read, validated and fitted to the length limit, and only then
the model weights and the trainer. `--dry-run` stops after the data, printing its statistics.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_fast.cli.common import (
    CLIError,
    DataOptions,
    PPODataOptions,
    check_file,
    check_model_dir,
    load_run_config,
    load_tokenizer,
    load_weights,
    model_max_positions,
    note,
    run_config_class,
)
from rlhf_fast.cli.training_job import (
    Execute,
    Job,
    build_trainer,
    common_outputs,
    epoch_memory,
    epoch_steps,
    holding_resources,
    length_limit,
    output_dir,
    ppo_memory,
    prepare_data,
    read_all,
    resume_from,
    run_training,
    start_run,
    training_summary,
)

__all__ = ["run_ppo", "run_rm", "run_sft"]


# ----------------------------------------------------------------------------------------------------- sft


def _epoch_run_inputs(args, config_class, sequence: str, inputs: list[tuple[str, str, str | None]]):
    """What `sft` and `rm` read before training, checked: (model dir, output dir, run config, tokenizer,
    length limit of one `sequence`, datasets). `inputs` are (flag, format, path or None)."""
    model_dir = check_model_dir("--model", args.model)
    for flag, _, path in inputs:
        if path is not None:
            check_file(flag, path)
    out = output_dir(args)
    config = load_run_config(
        run_config_class(config_class, DataOptions), args, resume_config=resume_from(args)
    )
    tokenizer = load_tokenizer("--model", model_dir)
    limit = length_limit(
        config.data.max_length, model_max_positions("--model", model_dir), "--model", sequence
    )
    datasets = read_all(inputs, tokenizer, config.data)
    return model_dir, out, config, tokenizer, limit, datasets


@holding_resources
def run_sft(args, execute: Execute | None = None) -> int:
    from rlhf_fast.trainers.sft import SFTConfig, SFTTrainer

    model_dir, out, config, tokenizer, limit, datasets = _epoch_run_inputs(
        args,
        SFTConfig,
        "prompt + response + eos",
        [("--data", "demonstrations", args.data), ("--eval-data", "demonstrations", args.eval_data)],
    )
    limits = {dataset.flag: limit for dataset in datasets}
    job = Job(
        "sft",
        config,
        out,
        datasets,
        plan=lambda: epoch_steps(
            len(datasets[0].encoded), config.batch_size, config.epochs, config.max_steps
        ),
    )
    if args.dry_run:
        job.memory = lambda: epoch_memory(config, args, "--model", model_dir, limit, "lm", "sft", 1)
    status = prepare_data(job, args, tokenizer, config.data.truncation, limits)
    if status is not None:
        return status

    start_run(job, args)
    from rlhf_fast.models import PolicyModel

    policy = load_weights("--model", model_dir, PolicyModel.from_pretrained)
    eval_data = datasets[1].items if len(datasets) > 1 else None
    trainer = build_trainer(
        lambda: SFTTrainer(config, policy, datasets[0].items, eval_data=eval_data, tokenizer=tokenizer)
    )
    if execute is not None:
        return execute(job, trainer)
    metrics, before, seconds = run_training(job, trainer)
    outputs = [
        ("model", str(out / "final"), "AutoModelForCausalLM.from_pretrained; --model of `rlhf-fast rm`")
    ]
    training_summary(job, metrics, trainer.global_step, before, seconds, outputs + common_outputs(out))
    return 0


# ------------------------------------------------------------------------------------------------------ rm


@holding_resources
def run_rm(args, execute: Execute | None = None) -> int:
    from rlhf_fast.trainers.reward import RewardConfig, RewardTrainer

    model_dir, out, config, tokenizer, limit, datasets = _epoch_run_inputs(
        args,
        RewardConfig,
        "prompt + completion + eos",
        [
            ("--data", "rankings", args.data),
            ("--eval-data", "rankings", args.eval_data),
            ("--reference", "demonstrations", args.reference),
        ],
    )
    by_flag = {dataset.flag: dataset for dataset in datasets}
    limits = {dataset.flag: limit for dataset in datasets}
    train = by_flag["--data"]
    job = Job(
        "rm",
        config,
        out,
        datasets,
        plan=lambda: epoch_steps(len(train.encoded), config.batch_size, config.epochs, config.max_steps),
    )
    if args.dry_run:

        def rm_memory():
            largest_group = max((len(item.completion_ids) for item in train.encoded), default=2)
            return epoch_memory(config, args, "--model", model_dir, limit, "scalar", "rm", largest_group)

        job.memory = rm_memory
    if args.reference is None:
        job.notes.append("reward normalization: off (no --reference demonstrations)")
    elif not config.normalize:
        job.notes.append("reward normalization: off (normalize is false in the config)")
    status = prepare_data(job, args, tokenizer, config.data.truncation, limits)
    if status is not None:
        return status

    start_run(job, args)
    from rlhf_fast.models import RewardModel

    # A reward model directory continues training as is; a causal LM (the SFT model) gets a fresh head.
    is_reward_model = (Path(model_dir) / RewardModel.head_file).is_file()
    loader = RewardModel.from_pretrained if is_reward_model else RewardModel.from_policy
    model = load_weights("--model", model_dir, loader)
    eval_data = by_flag["--eval-data"].items if "--eval-data" in by_flag else None
    reference = by_flag["--reference"].items if "--reference" in by_flag else None
    trainer = build_trainer(
        lambda: RewardTrainer(
            config, model, train.items, eval_data=eval_data, normalization_data=reference, tokenizer=tokenizer
        )
    )
    if execute is not None:
        return execute(job, trainer)
    metrics, before, seconds = run_training(job, trainer)
    if reference is not None and config.normalize:
        job.notes = [
            (
                f"reward normalization: the --reference set scores mean 0 (offset "
                f"{trainer.model.normalization_bias:.4g}, saved with the model)"
            )
        ]
    outputs = [
        (
            "model",
            str(out / "final"),
            "RewardModel.from_pretrained (backbone: AutoModel); --reward of `rlhf-fast ppo`",
        )
    ]
    training_summary(job, metrics, trainer.global_step, before, seconds, outputs + common_outputs(out))
    return 0


# ----------------------------------------------------------------------------------------------------- ppo


def _reward_tokenizer(reward_dir: str, tokenizer, reencode: bool):
    """The reward model's own tokenizer when it differs from the policy's and `reencode_for_reward` is on (PPO
    then decodes and re-encodes the responses for scoring), else None; a differing one without it is an error."""
    from transformers import AutoTokenizer

    from rlhf_fast.models.loading import same_vocabulary

    try:
        reward_tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    except Exception:  # noqa: BLE001 (any failure means: no usable tokenizer there)
        note(f"--reward {reward_dir}: no tokenizer saved there; assuming it shares the policy's vocabulary")
        return None
    if same_vocabulary(reward_tokenizer, tokenizer):
        return None
    if not reencode:
        raise CLIError(
            f"--reward {reward_dir}: its tokenizer's vocabulary differs from the policy's; PPO scores the "
            "policy's tokens with the reward model, so both must come from the same tokenizer, or pass "
            "--set reencode_for_reward=true to decode each response and re-encode it for the reward model"
        )
    note(f"--reward {reward_dir}: its own tokenizer; responses are decoded and re-encoded for scoring")
    return reward_tokenizer


@holding_resources
def run_ppo(args, execute: Execute | None = None) -> int:
    from rlhf_fast.trainers.ppo import PPOConfig, PPOTrainer

    policy_dir = check_model_dir("--policy", args.policy)
    reward_dir = check_model_dir("--reward", args.reward, reward=True)
    check_file("--prompts", args.prompts)
    if args.pretrain is not None:
        check_file("--pretrain", args.pretrain)
    out = output_dir(args)
    config = load_run_config(
        run_config_class(PPOConfig, PPODataOptions), args, resume_config=resume_from(args)
    )
    tokenizer = load_tokenizer("--policy", policy_dir)
    reward_tokenizer = _reward_tokenizer(reward_dir, tokenizer, config.reencode_for_reward)

    positions = model_max_positions("--policy", policy_dir)
    reward_positions = model_max_positions("--reward", reward_dir)
    # Prompt limit: --max-length, or PPOConfig.max_prompt_length, or what max_new_tokens leaves of the model.
    requested = [value for value in (config.data.max_length, config.max_prompt_length) if value is not None]
    if requested:
        prompt_limit = min(requested)
    elif positions is None:
        raise CLIError(
            "--policy: the model's config does not say how many positions it covers; pass --max-length"
        )
    else:
        prompt_limit = positions - config.max_new_tokens
        if prompt_limit < 1:
            raise CLIError(
                f"config: max_new_tokens {config.max_new_tokens} leaves no room for a prompt in the "
                f"policy's {positions} positions"
            )
    sequence = prompt_limit + config.max_new_tokens
    for flag, limit in (("--policy", positions), ("--reward", reward_positions)):
        if limit is not None and sequence > limit:
            raise CLIError(
                f"prompt limit {prompt_limit} + max_new_tokens {config.max_new_tokens} = {sequence} "
                f"tokens: more than the {limit} positions of the {flag} model; lower --max-length "
                "or max_new_tokens"
            )
    block_size = config.data.pretrain_block_size or min(sequence, positions or sequence)
    if positions is not None and block_size > positions:
        raise CLIError(
            f"config: data.pretrain_block_size {block_size} is longer than the policy's {positions} positions"
        )

    datasets = read_all(
        [("--prompts", "prompts", args.prompts), ("--pretrain", "pretrain", args.pretrain)],
        tokenizer,
        config.data,
    )
    by_flag = {dataset.flag: dataset for dataset in datasets}
    limits = {"--prompts": prompt_limit, "--pretrain": block_size}
    prompts = by_flag["--prompts"]

    def plan() -> int:
        if len(prompts.encoded) < config.batch_size:
            raise CLIError(
                f"--prompts {prompts.path}: {len(prompts.encoded)} prompts are fewer than one batch "
                f"(batch_size {config.batch_size}); lower it, e.g. --set batch_size="
                f"{len(prompts.encoded)}"
            )
        return config.max_iterations or config.epochs * (len(prompts.encoded) // config.batch_size)

    job = Job("ppo", config, out, datasets, plan=plan, step_name="iterations")
    if args.dry_run:
        job.memory = lambda: ppo_memory(config, args, policy_dir, reward_dir, prompt_limit)
    job.notes.append(f"prompts up to {prompt_limit} tokens, responses up to {config.max_new_tokens} tokens")
    if "--pretrain" in by_flag:
        job.notes.append(f"PPO-ptx: pretraining blocks of {block_size} tokens, ptx_coef {config.ptx_coef}")
    status = prepare_data(job, args, tokenizer, config.data.truncation, limits)
    if status is not None:
        return status

    start_run(job, args)
    from rlhf_fast.models import PolicyModel, RewardModel

    policy = load_weights("--policy", policy_dir, PolicyModel.from_pretrained)
    reward_model = load_weights("--reward", reward_dir, RewardModel.from_pretrained)
    pretrain = by_flag["--pretrain"].items if "--pretrain" in by_flag else None
    trainer = build_trainer(
        lambda: PPOTrainer(
            config,
            policy,
            reward_model,
            prompts.items,
            pretrain_data=pretrain,
            tokenizer=tokenizer,
            reward_tokenizer=reward_tokenizer,
        )
    )
    if execute is not None:
        return execute(job, trainer)
    metrics, before, seconds = run_training(job, trainer)
    outputs = [
        ("policy", str(out / "final"), "AutoModelForCausalLM.from_pretrained; --policy of `rlhf-fast eval`")
    ]
    training_summary(job, metrics, trainer.iteration_index, before, seconds, outputs + common_outputs(out))
    return 0
