"""Procedurally generated instruction tasks with checkable answers, for the distillation lab.

Each task family draws prompts from a seeded `random.Random`, gives one valid answer for training rows, and
checks any response. The three families have different shapes:

- `sort` (one correct answer): "sort: q c k a" -> "a c k q".
- `pick` (many valid answers): "pick 3 between c and p" -> any 3 letters strictly between, in alphabetical order
  ("d h o", "f g m", ...). The teacher learns a multi-modal distribution, so sampled quality differs from greedy
  quality and the number of distinct valid answers per prompt measures diversity. Evaluated in distribution, like
  `walk` (its few hundred prompts are few enough to learn by heart).
- `walk` (long structured output, 24 letters + end token): "walk from d by 3" -> "g j m p ..." (each letter is the
  previous one shifted by the step, wrapping after z). One early mistake spoils the rest, the case SCRG exists
  for. Its 26 x 12 prompts are few enough that models learn them by heart rather than the rule (measured: a
  teacher perfect on its training prompts scored 0.5 on held-out ones), so `walk` is evaluated in distribution
  (`held_out = False`): on prompts that training also draws.

Letters are single tokens of the lab tokenizer (` a` ... ` z`), so answer quality is decided token by token.
Responses are compared after `str.split()`, so surrounding whitespace does not matter.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Task:
    """A task family: `sample(rng) -> (prompt, answer)`, `check(prompt, response) -> bool`."""

    name: str
    shape: str
    held_out: bool = True  # evaluation prompts are excluded from every training set

    def sample(self, rng: random.Random) -> tuple[str, str]:
        raise NotImplementedError

    def check(self, prompt: str, response: str) -> bool:
        raise NotImplementedError

    def rows(self, n: int, seed: int, exclude=frozenset(), distinct: bool = True) -> list[dict]:
        """`n` rows `{"task", "prompt", "answer"}` whose prompts are not in `exclude` (and, with `distinct`, not
        repeated). Deterministic in `(task, seed)`."""
        rng = random.Random(f"{self.name}-{seed}")
        seen, rows = set(exclude), []
        for _ in range(200 * n):
            if len(rows) == n:
                break
            prompt, answer = self.sample(rng)
            if prompt not in seen:
                if distinct:
                    seen.add(prompt)
                rows.append({"task": self.name, "prompt": prompt, "answer": answer})
        if len(rows) < n:
            raise ValueError(f"task {self.name!r}: only {len(rows)} distinct prompts, {n} asked for")
        return rows


@dataclass(frozen=True)
class SortTask(Task):
    name: str = "sort"
    shape: str = "one correct answer"
    min_len: int = 4
    max_len: int = 7

    def sample(self, rng):
        letters = rng.sample(LETTERS, rng.randint(self.min_len, self.max_len))
        return "sort: " + " ".join(letters), " ".join(sorted(letters))

    def check(self, prompt, response):
        return response.split() == sorted(prompt.split(":", 1)[1].split())


@dataclass(frozen=True)
class PickTask(Task):
    name: str = "pick"
    shape: str = "many valid answers"
    held_out: bool = False

    def sample(self, rng):
        k = rng.choice((2, 3))
        lo = rng.randrange(26 - k - 3)
        hi = rng.randrange(lo + k + 3, 26)  # at least k + 2 letters strictly between
        answer = sorted(rng.sample(LETTERS[lo + 1 : hi], k))
        return f"pick {k} between {LETTERS[lo]} and {LETTERS[hi]}", " ".join(answer)

    def check(self, prompt, response):
        words, got = prompt.split(), response.split()
        k, lo, hi = int(words[1]), words[3], words[5]
        return len(got) == k and all(lo < g < hi for g in got) and all(a < b for a, b in zip(got, got[1:]))


@dataclass(frozen=True)
class WalkTask(Task):
    name: str = "walk"
    shape: str = "long structured output (24 tokens)"
    held_out: bool = False
    length: int = 24
    max_step: int = 12

    def sample(self, rng):
        start, step = rng.randrange(26), rng.randint(1, self.max_step)
        return f"walk from {LETTERS[start]} by {step}", self._walk(start, step)

    def answer(self, prompt: str) -> str:
        """The one valid answer to a `walk` prompt."""
        words = prompt.split()
        return self._walk(LETTERS.index(words[2]), int(words[4]))

    def _walk(self, start: int, step: int) -> str:
        return " ".join(LETTERS[(start + step * (i + 1)) % 26] for i in range(self.length))

    def check(self, prompt, response):
        return response.split() == self.answer(prompt).split()


TASKS: dict[str, Task] = {t.name: t for t in (SortTask(), PickTask(), WalkTask())}


def to_messages(row: dict) -> dict:
    """A lab row as ordinary `messages` data (the user's prompt, the assistant's answer)."""
    return {"messages": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["answer"]}]}
