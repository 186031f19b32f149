"""`MGSRConfig`: `GKDConfig` plus the options of MGSR (DESIGN.md §1-§5).

Every MGSR choice that the paper leaves open is an option here with the default of DESIGN.md; the help text says
which ones are our choice.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from ._trl import GKDConfig
from .losses.dac_kl import DIVERGENCES
from .losses.dac_kl import STUDENT_SUPPORTS as DAC_STUDENT_SUPPORTS
from .losses.span import SPAN_DISTANCES, SPAN_OBJECTIVES
from .scrg import CONTINUATIONS as SCRG_CONTINUATIONS
from .scrg import ERROR_RULES as SCRG_ERROR_RULES
from .scrg import KL_DIRECTIONS
from .scrg import TEACHER_TOKENS as SCRG_TEACHER_TOKENS

GKD_DEFAULT_BETA = next(f.default for f in fields(GKDConfig) if f.name == "beta")

SCHEDULES = ("gkd", "adaptive")
DAC_MODES = ("learned", "fixed")
DAC_BAND_OBJECTIVES = ("label", "joint")
SPAN_EXTRACTORS = ("builtin", "nltk", "spacy")


@dataclass
class MGSRConfig(GKDConfig):
    r"""
    Configuration for [`MGSRTrainer`]: every [`GKDConfig`] option (and so every `SFTConfig`/`TrainingArguments`
    option) plus the options of Multi-Granularity Semantic Revision.

    The objective is `sft_weight * L_SFT + dac_weight * L_DAC-KL + span_weight * L_span` (`+ scrg_correction_weight *
    L_correction`). GKD's `beta` is not used
    (DAC-KL has its own `dac_divergence` and `dac_beta`; a `beta` other than GKD's default gets a warning); `temperature` is the
    sampling temperature of on-policy generation only (the losses use `dac_temperature`); `lmbda`, `seq_kd` and
    `max_new_tokens` keep their GKD meaning.

    > Loss weights

    sft_weight (`float`, defaults to `0.0`): weight of the cross-entropy on the dataset's ground-truth completion.
        Off by default since the Dolly rerun with `dac_hi` 0.75 (2 training seeds, GKD and SFT in the same run):
        ROUGE-L 6.50 without the term against 5.79 with it (GKD 5.59); on the lab the mean is level or
        a little higher without it (+0.004 to +0.007 across the four settings, from `pick`; `walk` 0.114 against
        0.121 at the defaults), and a step skips a student forward (lab training time 0.90x GKD's against 1.15x).
        Our first specification (DESIGN.md) had it at 1.0: `sft_weight=1.0` restores it.
    dac_weight (`float`, defaults to `1.0`): weight of the DAC-KL term.
    span_weight (`float`, defaults to `0.0`): weight of the span term. Off by default since no weight or
        formulation measured makes the student better: the lab's mean is level or higher without it at weight 0.1
        (+0.008 / +0.001 / +0.004 / +0.004 at the defaults, lr 5e-4, `lmbda` 1 and the larger student; `pick` +0.020
        at the defaults), Dolly's ROUGE-L level (+0.06 ± 0.21 over 3 training seeds), and at 1.0 it lowered the lab's
        student (0.27 against 0.32). It was 0.1; `span_weight=0.1` restores it (README, Quality).
    scrg_correction_weight (`float`, defaults to `0.1`): weight of an extra term on the positions SCRG corrected
        (the student's own mistakes, on its own prefix): the forward KL (`scrg_correction_divergence`) to the whole
        teacher distribution there, averaged over the corrections (no term when SCRG is off or corrects nothing).
        Not in the paper. Chosen over 0.3 (the default before) and 0 by the lab pooled over three initial students
        × 3 training seeds and by Dolly over 5 training seeds (README, Quality): at 0.3 the lab's small student
        scored higher without the term (+0.009 ± 0.008 at the defaults, +0.005 ± 0.004 at lr 5e-4), at 0.1 it is
        level with 0 in every setting (CHANGELOG); Dolly ROUGE-L 6.52 at 0.1, 6.50 at 0.3, 6.27 at 0 (paired
        0 − 0.1: −0.25 ± 0.22).
    scrg_correction_divergence (`str`, defaults to `"forward"`): that term's divergence, one of `dac_divergence`'s
        choices (`jsd`/skews take `dac_beta`/`dac_skew`). Lab: reverse KL and JSD score the same as forward KL (0.34).

    > SCRG (sequence correction and re-generation)

    scrg_rounds (`int`, defaults to `1`): correction rounds per on-policy sample; `0` turns SCRG off.
    scrg_error (`str`, defaults to `"first_rejected"`): which position is the error: the first token the teacher
        rejects, p_teacher(y_i) < scrg_reject_ratio * max_v p_teacher(v) (`"first_rejected"`; needs no student
        forward), or the paper's position of largest teacher-student divergence D_i (`"max_divergence"`), which is
        often after an earlier error that then stays in the sample. Default by the lab (`benchmarks/lab`, 3 seeds):
        `sort` sampled validity 0.21 vs 0.19, no task lower.
    scrg_reject_ratio (`float`, defaults to `0.1`): the threshold of `"first_rejected"`, in (0, 1).
    scrg_kl_direction (`str`, defaults to `"forward"`): direction of the per-position difference D_i,
        `"forward"` = KL(teacher || student), `"reverse"` = KL(student || teacher).
    scrg_teacher_token (`str`, defaults to `"greedy"`): the correction token, the teacher's argmax (`"greedy"`)
        or a sample from the teacher (`"sample"`).
    scrg_allow_eos_correction (`bool`, defaults to `True`): whether an end token may be the correction (the row
        then ends there).
    scrg_reuse_teacher_logits (`bool`, defaults to `True`): the loss takes the teacher's logits from SCRG's pass
        wherever the revised row still matches it (unchanged rows, and a corrected row up to its correction) and
        runs the teacher only on rows with positions past that. Same values (parity-tested); holds one
        `[batch, completion, vocab]` tensor per micro-batch of the accumulation window until that micro-batch's loss.
    scrg_continuation (`str`, defaults to `"regenerate"`): what follows a correction: the student re-generates the
        rest of the row (`"regenerate"`, the paper) or the row ends at the corrected token (`"stop"`: no second
        `generate`, and the loss's teacher logits are those of SCRG's pass). Default by the Dolly benchmark: there
        `"regenerate"` trains in GKD's time and scores 5.32 ROUGE-L against 5.01 for `"stop"`; `"stop"` wins only on
        the lab's short answers when GKD runs without gradient checkpointing (README, "What follows an SCRG
        correction").
    scrg_block_size (`int`, defaults to `16`): with `scrg_error="first_rejected"`, SCRG runs while the student
        samples (`scrg_stream.py`): the teacher judges the new tokens in one forward per block (2 tokens, then blocks
        doubling up to `scrg_block_size`), a rejected token is corrected on the spot and the student samples on from
        it, so nothing sampled past an error is kept and the loss takes every teacher logit from these forwards.
        The same revision as sampling first and revising after (token for token with a deterministic student;
        tested), in one decoding pass. `0` samples first and revises after (`generate`, a teacher forward, a second
        `generate`), which `"max_divergence"` and sampling settings other than temperature/top-k/top-p/suppressed
        tokens always use. Ours; 16 by `benchmarks/bench_step.py` (README, "Training step").

    > DAC-KL (distribution-adaptive clipping KL)

    dac_mode (`str`, defaults to `"learned"`): `"learned"` band predicted by the sub-network, or `"fixed"` band
        `(dac_lo, dac_hi)` (the paper's ablation).
    dac_lo, dac_hi (`float`, defaults to `0.0`, `0.75`): the band on the teacher's cumulative sorted mass in
        `"fixed"` mode, and the band the sub-network starts from in `"learned"` mode. A token is kept while the mass
        ranked above it is below `hi`, so `hi` drops the teacher's tail (as top-p would). `hi` by the lab (3 seeds,
        GKD per seed): 0.75 against the earlier 0.95 lifts `pick` (many valid answers) from 0.67 to 0.75 at the
        defaults, 0.57 to 0.64 at a 4x lower learning rate, 0.67 to 0.75 fully on-policy and 0.81 to 0.89 with a
        larger student, and the mean in every setting; it costs `walk` 0.02 at the defaults. Unclipped (`hi=1`)
        loses 0.03 of `pick` to GKD; 0.85 lies between; 0.65 costs more `walk`.
    dac_min_width (`float`, defaults to `0.5`): the smallest band width `hi - lo`.
    dac_sharpness (`float`, defaults to `50.0`): slope of the soft (sigmoid) band edges.
    dac_student_support (`str`, defaults to `"full"`): `"full"` compares the clipped, renormalised teacher with the
        full student distribution. `"band"` compares both distributions on the kept tokens plus one lumped "rest"
        outcome holding the clipped mass (= `Z_p KL(p~||q~) + KL(Bern(Z_p)||Bern(Z_q))`, Z = kept mass); our
        choice, because the literal `KL(p~||q~)` is 0 for any student once the band holds a single token, which
        would let the band switch distillation off.
    dac_divergence (`str`, defaults to `"reverse"`): the divergence between the clipped teacher p~ and the student
        q (the default by the lab: reverse 0.32 against forward 0.28 mean sampled validity, GKD 0.30; DESIGN.md's
        was forward): `"forward"` KL(p~||q), `"reverse"` KL(q||p~), `"jsd"` (GKD's generalised JSD with `dac_beta`),
        `"skew_forward"` / `"skew_reverse"` (DistiLLM's skew KL / skew reverse KL with `dac_skew`), `"adaptive"`
        (AKL, Wu et al. 2024: per position, forward KL weighted by the gap on the teacher's head, reverse KL by the
        gap on its tail; in the lab it brings `walk` from 0.09 to SFT's 0.11 at the same mean, `sort` 0.02 lower).
    dac_rescue_weight (`float`, defaults to `0.0`, off): on sequences the student did not sample (the dataset's, or
        the teacher's with `seq_kd`), adds `dac_rescue_weight * -log(sum_i m_i q_i)` per position, the student's
        log-mass inside the band, the mask held constant (ours, issue 14). The reverse KL's gradient vanishes where
        the student concentrates on a rejected token (its loss is large there but flat); the rescue's moves the mass
        outside the band into it, in the student's own proportions among the kept tokens, and is ~0 wherever the
        student keeps its mass in the band. In the lab (3 seeds, README's Quality section) weight 10 lifts `walk`, a
        per-prompt fact learned by heart, from 0.096 to 0.120 (SFT 0.110) and the mean by 0.009 at the defaults, and
        the mean by 0.011 with a wider student (hidden 64 against 48), but costs 0.009 (`sort` 0.018) at a 4x lower
        learning rate, so it is off by default; a first form, `weight * (1 - sum_i m_i q_i) * KL(p~ || q)`, pulled
        toward the clipped teacher's whole shape and cost `sort`/`pick` at both learning rates. Try it where the
        student must learn facts it gets confidently wrong. Needs `dac_student_support="full"`.
    dac_beta (`float`, defaults to `0.5`): the JSD interpolation of `dac_divergence="jsd"` (as GKD's `beta`).
    dac_skew (`float`, defaults to `0.1`): the skew of `"skew_forward"`/`"skew_reverse"` (DistiLLM's alpha).
    dac_temperature (`float`, defaults to `1.0`): softmax temperature of both distributions in the loss.
    dac_features (`int`, defaults to `32`): number of top sorted teacher probabilities fed to the sub-network.
    dac_hidden_size (`int`, defaults to `256`): hidden width of the sub-network.
    dac_top_k (`int` or `None`, defaults to `None`): sort only the teacher's top-k tokens (the rest count as the
        tail) to save time on very large vocabularies; `None` sorts the whole vocabulary.
    dac_band_objective (`str`, defaults to `"label"`): what trains the sub-network. `"label"` (ours): its own
        objective on micro-batches whose labels are the data's, keeping the ground-truth token's interval inside
        the band at a cost `dac_band_width_cost` per unit of width (`trl_mgsr.losses.band_label_loss`); it never
        sees the student, so it cannot move the target toward the student. `"joint"` (the paper's): the DAC-KL
        loss itself, shared with the student (measured to pull the target toward the student).
    dac_band_width_cost (`float`, defaults to `0.1`): the width cost of `dac_band_objective="label"`.
    dac_learning_rate (`float`, defaults to `1e-4`): learning rate of the sub-network's optimizer parameter group.

    > Span level

    span_extractor (`str`, defaults to `"builtin"`): `"builtin"` (offline punctuation/closed-class splitter),
        `"nltk"` (regexp NP/VP/PP chunker) or `"spacy"` (noun chunks). A callable `text -> [(start, end)]` can be
        passed to `MGSRTrainer(span_extractor=...)` instead.
    span_extractor_kwargs (`dict` or `None`): keyword arguments of the extractor (e.g. `{"model": "en_core_web_sm"}`
        for spaCy).
    span_objective (`str`, defaults to `"loglik"`): `"loglik"`: the span log-likelihood consistency (each span's
        mean token log-probability under the student against the teacher's, squared gap; see
        `trl_mgsr.losses.span_loglik_loss`); `"product"`: DESIGN.md's correlation of adjacent distributions
        `p_k * p_(k+1)` compared with `span_distance` (measured to lower the student in the lab).
    span_distance (`str`, defaults to `"kl"`): distance between teacher and student span correlations, `"kl"` on the
        products normalised to sum 1, `"l2"` or `"l1"`.

    > Memory

    loss_chunk_size (`int`, defaults to `1024`): completion positions (SFT, DAC-KL, SCRG's differences) or span
        pairs (span loss) processed at once; bounds the `[chunk, vocab]` float32 working tensors.

    > Data schedule

    schedule (`str`, defaults to `"gkd"`): `"gkd"` (GKD's `lmbda` coin per micro-batch) or `"adaptive"`
        (DistiLLM's adaptive off-policy schedule with a replay buffer).
    init_threshold (`float`, defaults to `0.0`): adaptive schedule: starting probability of using student samples.
    threshold_step (`float`, defaults to `0.1`): adaptive schedule: increase of that probability when the
        evaluation loss rises by more than `loss_eps`.
    loss_eps (`float`, defaults to `0.1`): adaptive schedule: evaluation-loss rise that triggers the increase.
    replay_capacity (`int`, defaults to `1000`): adaptive schedule: replay buffer size (samples).
    replay_ratio_start, replay_ratio_end (`float`, defaults to `0.5`, `0.0`): adaptive schedule: share of
        student-sample micro-batches drawn from the replay buffer instead of generated afresh, decreasing linearly
        over training. Our choice.

    > Models and generation

    truncate_teacher_vocab (`bool`, defaults to `False`): when student and teacher vocab sizes differ only by
        padding rows (every tokenizer id below both sizes), compare logits on the shared vocabulary. Any other
        mismatch is an error.
    generation_use_cache (`bool`, defaults to `True`): generate with the KV cache even when gradient checkpointing
        is on (GKD turns the cache off; generation runs with checkpointing disabled anyway).
    """

    _VALID_DICT_FIELDS = GKDConfig._VALID_DICT_FIELDS + ["span_extractor_kwargs"]

    # Loss weights
    sft_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the cross-entropy on the dataset's ground-truth completion (0: off, the default "
                  "by the Dolly benchmark; DESIGN.md's first specification had 1.0)."},
    )
    dac_weight: float = field(default=1.0, metadata={"help": "Weight of the DAC-KL term."})
    span_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the span consistency term (off by default: no weight measured made the student "
                  "better; 0.1 was the default before)."},
    )

    # SCRG
    scrg_correction_weight: float = field(
        default=0.1,
        metadata={"help": "Weight of the divergence to the teacher (scrg_correction_divergence, forward KL by "
                          "default) at each SCRG-corrected position (the student's own mistakes, on its own prefix), "
                          "averaged over the corrections; 0 turns it off (0.1: chosen by the lab and Dolly; it was "
                          "0.3)."},
    )
    scrg_correction_divergence: str = field(
        default="forward",
        metadata={"help": "Divergence of the SCRG correction term against the whole teacher: 'forward' KL(p||q), "
                          "'reverse', 'jsd' (dac_beta), 'skew_forward', 'skew_reverse' (dac_skew), 'adaptive'.",
                  "choices": list(DIVERGENCES)},
    )
    scrg_rounds: int = field(
        default=1, metadata={"help": "SCRG correction rounds per on-policy sample; 0 turns SCRG off."}
    )
    scrg_error: str = field(
        default="first_rejected",
        metadata={"help": "SCRG's error position: 'first_rejected' (the first token the teacher gives less than "
                          "scrg_reject_ratio times its top probability; default, by the lab) or 'max_divergence' (the "
                          "paper: the position of largest teacher-student divergence).",
                  "choices": list(SCRG_ERROR_RULES)},
    )
    scrg_reject_ratio: float = field(
        default=0.1,
        metadata={"help": "SCRG 'first_rejected': a token is an error when p_teacher(token) < ratio * max p_teacher."},
    )
    scrg_kl_direction: str = field(
        default="forward",
        metadata={
            "help": "Direction of SCRG's per-position difference: 'forward' = KL(teacher||student), 'reverse'.",
            "choices": list(KL_DIRECTIONS),
        },
    )
    scrg_teacher_token: str = field(
        default="greedy",
        metadata={"help": "SCRG correction token: teacher argmax ('greedy') or a teacher sample ('sample').",
                  "choices": list(SCRG_TEACHER_TOKENS)},
    )
    scrg_allow_eos_correction: bool = field(
        default=True, metadata={"help": "Whether SCRG may correct a position to an end token (the row ends there)."}
    )
    scrg_reuse_teacher_logits: bool = field(
        default=True,
        metadata={"help": "Reuse SCRG's teacher logits in the loss where they still hold (memory: see the docs)."},
    )
    scrg_continuation: str = field(
        default="regenerate",
        metadata={"help": "After an SCRG correction: 'regenerate' (the paper: the student re-generates the rest) "
                  "or 'stop' (the row ends there: no second generation, a cheaper step).",
                  "choices": list(SCRG_CONTINUATIONS)},
    )
    scrg_block_size: int = field(
        default=16,
        metadata={"help": "SCRG while sampling: most student tokens per teacher forward; 0: sample, then revise."},
    )

    # DAC-KL
    dac_mode: str = field(
        default="learned",
        metadata={"help": "DAC-KL band: 'learned' by the sub-network or 'fixed' to (dac_lo, dac_hi).",
                  "choices": list(DAC_MODES)},
    )
    dac_lo: float = field(
        default=0.0,
        metadata={"help": "Lower band edge on the teacher's cumulative sorted mass (fixed band / learned start)."},
    )
    dac_hi: float = field(
        default=0.75,
        metadata={"help": "Upper band edge on the teacher's cumulative sorted mass (fixed band / learned start); "
                          "drops the teacher's tail beyond it, as top-p would."},
    )
    dac_min_width: float = field(default=0.5, metadata={"help": "Smallest DAC-KL band width hi - lo, in (0, 1]."})
    dac_sharpness: float = field(default=50.0, metadata={"help": "Slope of the soft DAC-KL band edges (> 0)."})
    dac_student_support: str = field(
        default="full",
        metadata={"help": "'full': KL against the full student distribution; 'band': both compared on the kept "
                  "tokens plus one lumped rest outcome.", "choices": list(DAC_STUDENT_SUPPORTS)},
    )
    dac_divergence: str = field(
        default="reverse",
        metadata={"help": "Divergence between the clipped teacher and the student: 'forward' KL(p~||q), 'reverse' "
                  "KL(q||p~), 'jsd' (dac_beta), 'skew_forward', 'skew_reverse' (dac_skew), 'adaptive' (AKL).",
                  "choices": list(DIVERGENCES)},
    )
    dac_rescue_weight: float = field(
        default=0.0,
        metadata={"help": "On sequences the student did not sample (the dataset's), adds this weight x -log(the "
                  "student's mass inside the band) per position, a pull back into the band where the reverse KL has "
                  "none (>= 0; 0 turns it off; needs dac_student_support='full')."},
    )
    dac_beta: float = field(default=0.5, metadata={"help": "JSD interpolation of dac_divergence='jsd', in [0, 1]."})
    dac_skew: float = field(
        default=0.1, metadata={"help": "Skew of dac_divergence='skew_forward'/'skew_reverse', in [0, 1)."}
    )
    dac_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature in the DAC-KL loss (> 0)."})
    dac_features: int = field(
        default=32, metadata={"help": "Number of top sorted teacher probabilities fed to the band sub-network."}
    )
    dac_hidden_size: int = field(default=256, metadata={"help": "Hidden width of the band sub-network."})
    dac_top_k: int | None = field(
        default=None,
        metadata={"help": "Sort only the teacher's top-k tokens in DAC-KL (rest = tail); None sorts the full vocab."},
    )
    dac_band_objective: str = field(
        default="label",
        metadata={"help": "What trains the band sub-network: 'label' (its own objective: keep the ground-truth "
                  "token, narrowly) or 'joint' (the DAC-KL loss, shared with the student).",
                  "choices": list(DAC_BAND_OBJECTIVES)},
    )
    dac_band_width_cost: float = field(
        default=0.1, metadata={"help": "Width cost of dac_band_objective='label' (>= 0)."}
    )
    dac_learning_rate: float = field(
        default=1e-4, metadata={"help": "Learning rate of the band sub-network's optimizer parameter group."}
    )

    # Span level
    span_extractor: str = field(
        default="builtin",
        metadata={"help": "Span extractor: 'builtin' (offline), 'nltk' (regexp chunker) or 'spacy' (noun chunks).",
                  "choices": list(SPAN_EXTRACTORS)},
    )
    span_extractor_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Keyword arguments of the span extractor, as a dict or JSON string."}
    )
    span_objective: str = field(
        default="loglik",
        metadata={"help": "Span term: 'loglik' (span log-likelihood consistency) or 'product' (correlation of "
                  "adjacent distributions, with span_distance).", "choices": list(SPAN_OBJECTIVES)},
    )
    span_distance: str = field(
        default="kl",
        metadata={"help": "Distance between span correlations: 'kl', 'l2' or 'l1'.", "choices": list(SPAN_DISTANCES)},
    )

    # Memory
    loss_chunk_size: int = field(
        default=1024,
        metadata={"help": "Positions (SFT, DAC-KL, SCRG) or span pairs per loss chunk; bounds [chunk, vocab] memory."},
    )

    # Data schedule
    schedule: str = field(
        default="gkd",
        metadata={"help": "Data schedule: 'gkd' (lmbda coin per micro-batch) or 'adaptive' (DistiLLM, replay "
                  "buffer).", "choices": list(SCHEDULES)},
    )
    init_threshold: float = field(
        default=0.0, metadata={"help": "Adaptive schedule: starting probability of using student samples."}
    )
    threshold_step: float = field(
        default=0.1, metadata={"help": "Adaptive schedule: increase of that probability on an eval-loss rise."}
    )
    loss_eps: float = field(
        default=0.1, metadata={"help": "Adaptive schedule: eval-loss rise that raises the student probability."}
    )
    replay_capacity: int = field(default=1000, metadata={"help": "Adaptive schedule: replay buffer size (samples)."})
    replay_ratio_start: float = field(
        default=0.5, metadata={"help": "Adaptive schedule: share of student batches replayed, at the start."}
    )
    replay_ratio_end: float = field(
        default=0.0, metadata={"help": "Adaptive schedule: share of student batches replayed, at the end."}
    )

    # Models and generation
    truncate_teacher_vocab: bool = field(
        default=False,
        metadata={"help": "Compare logits on the shared vocabulary when student and teacher vocab sizes differ only "
                  "by padding rows."},
    )
    generation_use_cache: bool = field(
        default=True, metadata={"help": "Generate with the KV cache even when gradient checkpointing is on."}
    )

    def __post_init__(self):
        if isinstance(self.span_extractor_kwargs, str):  # from the command line: JSON
            try:
                self.span_extractor_kwargs = json.loads(self.span_extractor_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"MGSRConfig.span_extractor_kwargs must be a JSON object such as '{{\"model\": "
                    f"\"en_core_web_md\"}}', got {self.span_extractor_kwargs!r} ({err})."
                ) from None
        self._validate_mgsr()  # before TrainingArguments' checks (e.g. bf16 on a CPU), so MGSR mistakes show first
        # TRL sets the deprecated `gradient_checkpointing*` names by default; passing their values on under the new
        # names (when those are unset) is what TrainingArguments does, minus the FutureWarning on every config.
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if hasattr(self, new) and getattr(self, new) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
        super().__post_init__()
        if self.beta != GKD_DEFAULT_BETA:
            warnings.warn(
                f"MGSRConfig.beta={self.beta} is ignored: MGSR's token-level loss is DAC-KL, not GKD's generalized "
                "JSD. Use dac_divergence='jsd' with dac_beta for GKD's divergence.",
                stacklevel=3,
            )

    def _validate_mgsr(self):
        def fail(name, rule):
            raise ValueError(f"MGSRConfig.{name} {rule}, got {getattr(self, name)!r}.")

        for name, choices in (
            ("scrg_kl_direction", KL_DIRECTIONS),
            ("scrg_teacher_token", SCRG_TEACHER_TOKENS),
            ("scrg_error", SCRG_ERROR_RULES),
            ("scrg_continuation", SCRG_CONTINUATIONS),
            ("dac_mode", DAC_MODES),
            ("dac_student_support", DAC_STUDENT_SUPPORTS),
            ("dac_band_objective", DAC_BAND_OBJECTIVES),
            ("dac_divergence", DIVERGENCES),
            ("scrg_correction_divergence", DIVERGENCES),
            ("span_extractor", SPAN_EXTRACTORS),
            ("span_objective", SPAN_OBJECTIVES),
            ("span_distance", SPAN_DISTANCES),
            ("schedule", SCHEDULES),
        ):
            if getattr(self, name) not in choices:
                fail(name, f"must be one of {', '.join(map(repr, choices))}")
        for name in ("sft_weight", "dac_weight", "span_weight", "scrg_correction_weight"):
            if not self._is_number(name) or getattr(self, name) < 0:
                fail(name, "must be a number >= 0")
        if self.sft_weight + self.dac_weight + self.span_weight <= 0:
            raise ValueError(
                "MGSRConfig: sft_weight, dac_weight and span_weight are all 0, so there is nothing to train on "
                "most batches (scrg_correction_weight alone sees only the tokens SCRG corrects); set at least one of "
                "them > 0."
            )
        if (self.schedule == "adaptive" and max(self.replay_ratio_start, self.replay_ratio_end) > 0
                and self.replay_capacity < self.per_device_train_batch_size):
            fail("replay_capacity", f"must hold at least one batch (per_device_train_batch_size="
                 f"{self.per_device_train_batch_size}) for replay to ever happen")
        if not isinstance(self.span_extractor_kwargs, (dict, type(None))):
            fail("span_extractor_kwargs", "must be a dict of the extractor's keyword arguments (or None)")
        if not self._is_number("scrg_reject_ratio") or not 0.0 < self.scrg_reject_ratio < 1.0:
            fail("scrg_reject_ratio", "must be a number in (0, 1)")
        if isinstance(self.scrg_rounds, bool) or not isinstance(self.scrg_rounds, int) or self.scrg_rounds < 0:
            fail("scrg_rounds", "must be an integer >= 0 (0 turns SCRG off)")
        if isinstance(self.scrg_block_size, bool) or not isinstance(self.scrg_block_size, int) or \
                self.scrg_block_size < 0:
            fail("scrg_block_size", "must be an integer >= 0 (0 samples first and revises after)")
        for name in ("dac_features", "dac_hidden_size", "loss_chunk_size", "replay_capacity"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "must be an integer >= 1")
        if self.dac_top_k is not None and (not isinstance(self.dac_top_k, int) or self.dac_top_k < self.dac_features):
            fail("dac_top_k", f"must be None or an integer >= dac_features ({self.dac_features})")
        for name in ("dac_sharpness", "dac_temperature", "dac_learning_rate"):
            if not self._is_number(name) or getattr(self, name) <= 0:
                fail(name, "must be a number > 0")
        if not self._is_number("dac_beta") or not 0 <= self.dac_beta <= 1:
            fail("dac_beta", "must be in [0, 1]")
        if not self._is_number("dac_skew") or not 0 <= self.dac_skew < 1:
            fail("dac_skew", "must be in [0, 1)")
        if self.dac_student_support == "band" and self.dac_divergence not in ("forward", "reverse"):
            fail("dac_divergence", "must be 'forward' or 'reverse' with dac_student_support='band'")
        if self.dac_student_support == "band" and self._is_number("dac_rescue_weight") and self.dac_rescue_weight:
            fail("dac_rescue_weight", "must be 0 with dac_student_support='band' (the rescue, -log of the student's "
                 "mass in the band, is defined for the 'full' support only)")
        if not self._is_number("dac_min_width") or not 0 < self.dac_min_width <= 1:
            fail("dac_min_width", "must be in (0, 1]")
        for name in ("dac_lo", "dac_hi", "init_threshold", "replay_ratio_start", "replay_ratio_end"):
            if not self._is_number(name) or not 0 <= getattr(self, name) <= 1:
                fail(name, "must be in [0, 1]")
        if self.dac_lo > self.dac_hi:
            raise ValueError(
                f"MGSRConfig.dac_lo/dac_hi: the band edges are reversed (dac_lo={self.dac_lo} > dac_hi={self.dac_hi}); "
                "dac_lo is the lower edge: swap the two values."
            )
        if self.dac_hi - self.dac_lo < self.dac_min_width:
            raise ValueError(
                f"MGSRConfig.dac_lo/dac_hi: the band [{self.dac_lo}, {self.dac_hi}] is narrower than "
                f"dac_min_width={self.dac_min_width}; widen the band or lower dac_min_width."
            )
        for name in ("threshold_step", "loss_eps", "dac_band_width_cost", "dac_rescue_weight"):
            if not self._is_number(name) or getattr(self, name) < 0:
                fail(name, "must be a number >= 0")
        if not self._is_number("temperature") or self.temperature <= 0:
            fail("temperature", "must be > 0")
        if self.max_new_tokens < 1:
            fail("max_new_tokens", "must be an integer >= 1")

    def _is_number(self, name) -> bool:
        value = getattr(self, name)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
