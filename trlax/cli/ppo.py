"""`trlax ppo`: train a causal LM with TRL's classic PPO against a reward model, a reward adapter or a function.

With no flags it runs offline on embedded defaults (about a minute on 2 CPU cores): the
demo's tiny character-level GPT-2 (random init) as the policy and a tiny trained GPT-2
sequence classifier shipped in the package (`trlax/cli/data/tiny_reward_model`, a few kB)
that scores the fraction of vowels in a reply. Hyper-parameters left unset take TRL's
classic `PPOConfig` defaults with `--model`, and values tuned for the tiny default without.

Outputs in --output-dir: metrics.jsonl (one line per step), tensorboard/ (when tensorboardX
or tensorboard is installed), ppo.png (matplotlib), state/ (Orbax training states with
--save-every), and final/: the policy in HF/TRL layout (config.json + model.safetensors with
TRL's v_head, or a PEFT adapter folder for a LoRA policy) plus its tokenizer if it has one; with
--lora-r on the embedded policy, base/ holds that policy's base (it exists nowhere else), which the
adapter names.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import transformers
from tqdm.auto import tqdm

from trlax.cli.demo import positive_int
from trlax.cli.demo_task import CONSONANTS, START, decode_chars, encode_chars, tiny_gpt2_config
from trlax.cli.preflight import check_batch_fits, check_output_dir
from trlax.errors import TrlaxError
from trlax.generation_config import id_list
from trlax.models.auto import FlaxAutoModelForCausalLM, FlaxAutoModelForSequenceClassification
from trlax.models.sequence_classification import pad_token_id
from trlax.ppo import KL_PENALTIES, PPOConfig
from trlax.ppo_data import HFCodec, PromptSet, TextCodec, read_prompts
from trlax.ppo_log import PLOT_FILE, MetricsLog, plot
from trlax.ppo_rewards import AdapterReward, FunctionReward, ModelReward, RewardError, load_function
from trlax.ppo_trainer import Models, PPOTrainer, TrainerConfig, refuse_saved_state, resume, train
from trlax.reference import create_reference_model
from trlax.sharding import committed, make_mesh
from trlax.value_head import FlaxAutoModelForCausalLMWithValueHead

EMBEDDED_REWARD_MODEL = Path(__file__).resolve().parent / "data" / "tiny_reward_model"
FINAL_DIR = "final"
BASE_DIR = "base"  # a LoRA policy's embedded base, which its final/ adapter names
MAX_PROMPT_TOKENS = 256
# Flags that define a run besides the hyper-parameters: a resume with others is refused (mesh flags may change).
RUN_FLAGS = ("model", "reward_model", "reward_adapter", "reward_fn", "prompts", "max_prompt_length",
             "num_shared_layers", "lora_r")

# Unset flags: TRL's classic PPOConfig with --model; the tiny default's tuned values without it.
# TRL's PPOConfig defaults, but `steps` (TRL's is 20000: trlax runs a short job unless told).
TRL_DEFAULTS: dict[str, Any] = {
    "steps": 100, "batch_size": 128, "mini_batch_size": 128, "ppo_epochs": 4, "learning_rate": 1.41e-5,
    "init_kl_coef": 0.2, "adaptive_kl": True, "target": 6.0, "cliprange": 0.2, "cliprange_value": 0.2,
    "vf_coef": 0.1, "gamma": 1.0, "lam": 0.95, "max_new_tokens": 32, "temperature": 1.0, "top_k": 0,
    "top_p": 1.0, "max_grad_norm": None, "kl_penalty": "kl", "whiten_rewards": False, "use_score_scaling": False,
    "use_score_norm": False, "score_clip": None,
}
EMBEDDED_DEFAULTS: dict[str, Any] = {
    **TRL_DEFAULTS, "steps": 60, "batch_size": 32, "mini_batch_size": 16, "learning_rate": 1e-2,
    "init_kl_coef": 0.02, "adaptive_kl": False, "max_new_tokens": 12, "max_grad_norm": 1.0,
}


@dataclasses.dataclass(frozen=True)
class CharCodec:
    """The embedded character vocabulary (`trlax.cli.demo_task.CHARS`)."""

    def encode(self, text: str) -> list[int]:
        try:
            return encode_chars(text)
        except ValueError as e:
            raise TrlaxError(f"the embedded policy reads only its character vocabulary: {e}") from None

    def decode(self, ids: list[int]) -> str:
        return decode_chars(ids)


def embedded_prompts(n: int = 256) -> list[str]:
    """The default prompts: the start token and three random consonants (fixed, seed 0)."""
    rng = np.random.default_rng(0)
    return [START + "".join(rng.choice(list(CONSONANTS), 3)) for _ in range(n)]


def load_tokenizer(source: str | Path, vocab_size: int, base: str | None = None) -> Any | None:
    """A checkpoint's tokenizer if a usable one loads, else its `base`'s (the base model of a PEFT adapter
    folder, which holds no tokenizer), else None. transformers may build an empty tokenizer from a folder
    without tokenizer files, so one counts only if it covers half the vocabulary."""
    for name in dict.fromkeys(str(s) for s in (source, base) if s):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=Path(name).is_dir())
        except (OSError, ValueError, KeyError):
            continue
        if len(tokenizer) * 2 >= vocab_size:
            return tokenizer
    return None


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every hyper-parameter: the flag if given, else the profile's default."""
    defaults = EMBEDDED_DEFAULTS if args.model is None else TRL_DEFAULTS
    return {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in defaults.items()}


def trainer_config(args: argparse.Namespace) -> TrainerConfig:
    s = settings(args)
    ppo = PPOConfig(gamma=s["gamma"], lam=s["lam"], cliprange=s["cliprange"], cliprange_value=s["cliprange_value"],
                    vf_coef=s["vf_coef"], init_kl_coef=s["init_kl_coef"], adap_kl_ctrl=s["adaptive_kl"],
                    target=s["target"], kl_penalty=s["kl_penalty"], whiten_rewards=s["whiten_rewards"],
                    use_score_scaling=s["use_score_scaling"], use_score_norm=s["use_score_norm"],
                    score_clip=s["score_clip"])
    return TrainerConfig(steps=s["steps"], batch_size=s["batch_size"], mini_batch_size=s["mini_batch_size"],
                         ppo_epochs=s["ppo_epochs"], learning_rate=s["learning_rate"],
                         max_grad_norm=s["max_grad_norm"], max_new_tokens=s["max_new_tokens"],
                         temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], seed=args.seed,
                         save_every=args.save_every, gradient_checkpointing=args.gradient_checkpointing, ppo=ppo)


def run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that define a run besides the hyper-parameters (`PPOTrainer`'s `run`): a state saved with them
    resumes under `trlax ppo --resume` with the same flags, and is refused with others."""
    return {name: getattr(args, name) for name in RUN_FLAGS}


def build_models(args: argparse.Namespace) -> tuple[Models, list[str]]:
    """The policy (with value head), its reference, the tokenizer, the reward source and the prompt texts."""
    kinds = [k for k in ("reward_model", "reward_adapter", "reward_fn") if getattr(args, k) is not None]
    if len(kinds) > 1:
        raise RewardError(f"pass one reward source, not {', '.join('--' + k.replace('_', '-') for k in kinds)}")
    # What needs no model is read first: a bad flag fails before a large checkpoint loads.
    if args.model is not None and not kinds:
        raise RewardError("--model needs a reward: --reward-model PATH, --reward-adapter PATH (with --lora-r) or "
                          "--reward-fn MODULE:FUNCTION")
    if args.prompts is not None:
        texts = read_prompts(args.prompts)
    elif args.model is None:
        texts = embedded_prompts()
    else:
        raise TrlaxError("--model needs --prompts (a .txt file, a .jsonl file with a 'prompt' field, or a datasets "
                         "folder)")
    function = None if args.reward_fn is None else FunctionReward(load_function(args.reward_fn), args.reward_fn)
    sizes = {axis: getattr(args, axis) for axis in ("data", "fsdp", "tp") if getattr(args, axis) is not None}
    mesh = make_mesh(**{"data": 1, "fsdp": -1, "tp": 1, **sizes}) if sizes else None
    peft_config = None if args.lora_r is None else {"r": args.lora_r, "lora_alpha": 2 * args.lora_r}
    if args.reward_adapter is not None and peft_config is None:
        raise RewardError("--reward-adapter scores on the policy's frozen base, so the policy must be LoRA "
                          "(TRL's rule): add --lora-r R")
    head = {"summary_dropout_prob": 0.0}
    extra = {} if args.reward_adapter is None else {"reward_adapter": args.reward_adapter}
    if args.model is None:
        config = tiny_gpt2_config()
        lm = FlaxAutoModelForCausalLM.from_config(config, seed=args.seed)
        policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(lm, seed=args.seed, peft_config=peft_config,
                                                                       **head, **extra)
        codec: TextCodec = CharCodec()
        pad_id, eos_ids, tokenizer = 0, (), None
        policy_name = f"embedded tiny GPT-2 ({config.n_layer} layers x {config.n_embd}, characters, random init)"
        if mesh is not None:
            raise TrlaxError("--data/--fsdp/--tp need --model (the embedded policy is a few kB)")
    else:
        policy = FlaxAutoModelForCausalLMWithValueHead.from_pretrained(
            args.model, seed=args.seed, peft_config=peft_config, mesh=mesh, **head, **extra)
        tokenizer = load_tokenizer(args.model, int(policy.config.get_text_config().vocab_size),
                                   policy.base_model_name_or_path)
        if tokenizer is None:
            raise TrlaxError(f"no tokenizer loads from {args.model}: `trlax ppo` needs the checkpoint's tokenizer")
        codec = HFCodec(tokenizer)
        eos_ids = reply_end_ids(tokenizer, policy)
        pad = tokenizer.pad_token_id
        pad_id = int(pad) if pad is not None else (eos_ids[0] if eos_ids else 0)
        vocab = int(policy.config.get_text_config().vocab_size)
        if not 0 <= pad_id < vocab:
            raise TrlaxError(f"the tokenizer's pad id {pad_id} is outside the policy's vocabulary (size {vocab}): "
                             "resize the model's embeddings for the added token, or set tokenizer.pad_token = "
                             "tokenizer.eos_token")
        policy_name = f"{args.model} ({policy.config.model_type})"
    policy.params = committed(policy.params)
    if policy.is_peft_model and args.num_shared_layers is not None:
        raise TrlaxError("--num-shared-layers applies to a full-weight policy: a LoRA policy's reference is its own "
                         "base with the adapter off, which shares everything")
    shared = None if policy.is_peft_model else args.num_shared_layers
    reference = create_reference_model(policy, num_shared_layers=shared)
    reward = function or reward_source(args, policy, mesh)
    lora = "" if args.lora_r is None else f", LoRA r={args.lora_r} (frozen base)"
    ref = ("the base with the adapter off" if policy.is_peft_model else
           f"a frozen copy sharing {shared} layer(s)" if shared else "a frozen copy")
    description = {"policy": f"{policy_name} with TRL's value head{lora}", "reference": ref,
                   "reward": reward.description}
    return Models(policy, reference, codec, pad_id, eos_ids, reward, description, tokenizer), texts


def reply_end_ids(tokenizer: Any, policy: FlaxAutoModelForCausalLMWithValueHead) -> tuple[int, ...]:
    """The ids that end a reply: the tokenizer's eos, then every eos of the checkpoint's generation_config (a list
    for chat models, as Llama 3's end-of-turn token; transformers' generate in TRL's rollout stops at each); the
    model config's eos when neither has one."""
    settings = policy.pretrained_model.generation_config
    found = id_list(tokenizer.eos_token_id) + id_list(None if settings is None else settings.eos_token_id)
    return tuple(dict.fromkeys(found or id_list(policy.config.get_text_config().eos_token_id)))


def reward_source(args: argparse.Namespace, policy: Any, mesh: Any) -> Any:
    """The reward model or adapter the flags name (the embedded reward model without --model)."""
    if args.reward_adapter is not None:
        return AdapterReward(policy, args.reward_adapter)
    source = args.reward_model or EMBEDDED_REWARD_MODEL
    name = args.reward_model or "embedded tiny GPT-2 classifier (vowel fraction)"
    model = FlaxAutoModelForSequenceClassification.from_pretrained(source, mesh=mesh)
    if model.new_score_head:
        raise RewardError(f"reward model {name} has no trained score head (score.weight): it is a causal-LM "
                          "checkpoint, and its new head is random; pass a model trained as "
                          "AutoModelForSequenceClassification (e.g. with TRL's RewardTrainer)")
    rm_vocab = int(model.config.get_text_config().vocab_size)
    tokenizer = None
    if args.reward_model is not None:
        tokenizer = load_tokenizer(source, rm_vocab, getattr(model, "base_model_name_or_path", None))
    if tokenizer is None:  # the policy's ids, as generated
        policy_vocab = int(policy.config.get_text_config().vocab_size)
        if rm_vocab < policy_vocab:
            raise RewardError(f"reward model {name} has no tokenizer and a smaller vocabulary "
                              f"({rm_vocab}) than the policy ({policy_vocab}); "
                              "save its tokenizer with it")
        return ModelReward(model, None, str(name))
    pad = pad_token_id(model.config)  # transformers pools at the last token that is not it
    pad = tokenizer.pad_token_id if pad is None else pad
    return ModelReward(model, HFCodec(tokenizer), str(name), pad_id=pad)


def run_ppo_command(args: argparse.Namespace) -> int:
    output_dir = Path(args.output_dir) if args.output_dir else Path.cwd() / time.strftime("trlax-ppo-%Y%m%d-%H%M%S")
    check_output_dir(output_dir)
    if args.target_kl is not None:
        raise TrlaxError("--target-kl is TRL's early-stopping threshold (target_kl with early_stopping), which trlax "
                         "does not implement; the adaptive KL controller's target is --target (TRL's `target`)")
    if not args.resume:
        refuse_saved_state(output_dir)
    config = trainer_config(args)
    models, texts = build_models(args)
    # Every prompt has at least one token: a lower bound of the sequence length.
    check_batch_fits(models.policy.config, config.batch_size, 1 + config.max_new_tokens,
                     mini_batch_size=config.mini_batch_size)
    prompts = PromptSet.build(texts, models.codec, models.pad_id, args.max_prompt_length)
    trainer = PPOTrainer(models, prompts, config, run=run_flags(args))
    output_dir.mkdir(parents=True, exist_ok=True)  # only now: a run that cannot start leaves no folder
    for role, text in models.description.items():
        print(f"{role + ':':10} {text}")
    ppo = config.ppo
    kl = f"adaptive (target {ppo.target})" if ppo.adap_kl_ctrl else "fixed"
    print(f"{'PPO:':10} {config.steps} steps x {config.batch_size} replies ({len(texts)} prompts), "
          f"{config.ppo_epochs} epochs x minibatches of {config.mini_batch_size}, lr {config.learning_rate}, "
          f"KL coef {ppo.init_kl_coef} {kl}")
    start_step = 0
    if args.resume:
        start_step = resume(trainer, output_dir)
        print(f"resumed from step {start_step}" if start_step else "no saved state to resume: starting fresh")
    log = MetricsLog(output_dir, start_step)
    bar = tqdm(total=config.steps, initial=start_step, desc="PPO", unit="step", disable=args.quiet,
               dynamic_ncols=True)

    def on_step(metrics: dict[str, float]) -> None:
        log.write(metrics)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.3f}", refresh=False)

    try:
        train(trainer, output_dir, on_step=on_step)
    finally:
        bar.close()
        log.close()
    history = log.history()
    final, policy = output_dir / FINAL_DIR, models.policy
    if policy.is_peft_model and policy.base_model_name_or_path is None:
        # The embedded base exists only in memory: save it beside the adapter, which names it (as PEFT does).
        base = (output_dir / BASE_DIR).resolve()
        policy.pretrained_model.save_pretrained(base, params=policy.params["pretrained_model"])
        policy.base_model_name_or_path = str(base)
    policy.save_pretrained(final)
    if models.tokenizer is not None:
        models.tokenizer.save_pretrained(str(final))
    picture = plot(history, output_dir / PLOT_FILE) if history else None
    summary(history)
    print(f"wrote {final} (the policy, HF/TRL layout), {log.path.name}"
          f"{', ' + picture.name if picture else ''} to {output_dir}")
    return 0


def summary(history: list[dict[str, float]]) -> None:
    """Mean reward over the first and last tenth of the run."""
    if len(history) < 2:
        return
    k = max(1, len(history) // 10)
    first, last = np.mean([m["reward"] for m in history[:k]]), np.mean([m["reward"] for m in history[-k:]])
    print(f"mean reward: {first:.3f} over the first {k} step(s) -> {last:.3f} over the last {k}")


def add_ppo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ppo", help="train a causal LM with PPO (offline tiny default with no flags)",
        description=__doc__.split("\n\n")[0] + " With no flags: an offline run on embedded tiny models.")
    src = parser.add_argument_group("models and data")
    src.add_argument("--model", metavar="PATH_OR_HUB_ID", help="the causal-LM checkpoint to train (default: the "
                     "embedded tiny GPT-2); its tokenizer is used")
    src.add_argument("--reward-model", metavar="PATH_OR_HUB_ID", help="a sequence-classification checkpoint "
                     "(AutoModelForSequenceClassification, label 0 is the reward; or a PEFT SEQ_CLS adapter)")
    src.add_argument("--reward-adapter", metavar="PATH_OR_HUB_ID", help="a PEFT reward adapter on the policy's "
                     "base (TRL's multi-adapter PPO; needs --lora-r)")
    src.add_argument("--reward-fn", metavar="MODULE:FUNCTION", help="a Python function "
                     "f(prompts=[str], completions=[str]) -> [float]")
    src.add_argument("--prompts", metavar="PATH", help="a .txt file (one prompt per line), a .jsonl or .json file "
                     "with a 'prompt' field, or a datasets folder (save_to_disk) with a 'prompt' column")
    src.add_argument("--max-prompt-length", type=positive_int, default=MAX_PROMPT_TOKENS,
                     help=f"keep the last N tokens of each prompt (default {MAX_PROMPT_TOKENS})")
    hp = parser.add_argument_group("PPO hyper-parameters (TRL's names; unset: TRL's defaults with --model, "
                                   "tuned tiny values without)")
    for flag, kind in (("steps", positive_int), ("batch-size", positive_int), ("mini-batch-size", positive_int),
                       ("ppo-epochs", positive_int), ("learning-rate", float), ("init-kl-coef", float),
                       ("target", float), ("cliprange", float), ("cliprange-value", float), ("vf-coef", float),
                       ("gamma", float), ("lam", float), ("max-grad-norm", float), ("max-new-tokens", positive_int),
                       ("temperature", float), ("top-k", int), ("top-p", float), ("score-clip", float)):
        default = TRL_DEFAULTS[flag.replace("-", "_")]
        hp.add_argument(f"--{flag}", type=kind, default=None, help=f"default {default} with --model (TRL's: 20000)"
                        if flag == "steps" else f"TRL default {default}")
    hp.add_argument("--adaptive-kl", action=argparse.BooleanOptionalAction, default=None,
                    help="TRL's adaptive KL controller towards --target (default on with --model)")
    hp.add_argument("--kl-penalty", choices=KL_PENALTIES, default=None,
                    help="the per-token KL estimate: logp - ref, |logp - ref|, (logp - ref)^2 / 2, or the full KL "
                         "(TRL default kl)")
    for flag, what in (("whiten-rewards", "whiten the per-token rewards before GAE"),
                       ("use-score-scaling", "divide scores by their running std"),
                       ("use-score-norm", "also subtract their running mean (with --use-score-scaling)")):
        hp.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None,
                        help=f"{what} (TRL default off)")
    hp.add_argument("--target-kl", type=float, default=None, help=argparse.SUPPRESS)  # refused: see run_ppo_command
    model = parser.add_argument_group("policy and mesh")
    model.add_argument("--num-shared-layers", type=int, default=None,
                       help="layers the reference shares with the policy (frozen in both); default none")
    model.add_argument("--lora-r", type=positive_int, default=None,
                       help="train a LoRA adapter of this rank (alpha 2r) on a frozen base instead of every weight")
    model.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute each transformer block in the backward pass instead of storing its "
                            "activations (TrainingArguments' gradient_checkpointing): the same results within float32 "
                            "rounding; meant for GPU/TPU "
                            "memory (XLA:CPU keeps as much either way)")
    for axis in ("data", "fsdp", "tp"):
        model.add_argument(f"--{axis}", type=int, default=None, help=f"mesh size of the '{axis}' axis")
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", metavar="DIR", help="default: ./trlax-ppo-YYYYMMDD-HHMMSS")
    run.add_argument("--save-every", type=positive_int, default=None,
                     help="write an Orbax training state to DIR/state every N steps (and at the end)")
    run.add_argument("--resume", action="store_true", help="continue from the latest state in --output-dir")
    run.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_ppo_command)

