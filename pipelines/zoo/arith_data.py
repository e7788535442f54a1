"""The `arith` data set: multi-digit sums and differences with answers, plus short sentences.

Problems read ``417+85=502`` or ``417-85=332`` (operands of 1 to 3 digits; a difference is
never negative). A fixed, hashed 6% of all operand pairs is held out of training and is
what the accuracy gates are measured on. The sentences come from a small grammar
("the small cat sees a red ball."). The tokenizer, shared by arith-ar and arith-mdlm, is
character level, trained with the `tokenizers` library and saved as a
``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, MASK, UNK = "<pad>", "<bos>", "<eos>", "<mask>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, MASK, UNK]
MAX_OPERAND = 999
# the longest answer is 4 characters ("1998"); masked diffusion decodes a fixed window
# of answer characters padded with <eos>, so one more than that
ANSWER_LENGTH = 5

DETERMINERS = ("the", "a")
ADJECTIVES = ("small", "big", "red", "green", "happy", "old", "quiet")
NOUNS = ("cat", "dog", "bird", "ball", "tree", "house", "child", "boat")
VERBS = ("sees", "likes", "finds", "follows", "paints", "holds")
PLACES = ("in the park", "near the river", "on the hill", "at home")


def _random_operand(rng: random.Random) -> int:
    """An operand whose digit count (1 to 3) is uniform, so short and long sums are balanced."""
    digits = rng.randint(1, 3)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def is_held_out(a: int, op: str, b: int) -> bool:
    """Whether the problem `a op b` belongs to the held-out evaluation split (about 6%)."""
    key = (a * 1000 + b) * 2 + (op == "-")
    return ((key * 2654435761) % 2**32) >> 16 & 31 < 2  # a multiplicative hash, 2 of 32


def random_problem(rng: random.Random, held_out: bool = False) -> tuple[str, str]:
    """A (prompt, answer) pair such as ("417+85=", "502") from the train or held-out split."""
    while True:
        a, b = _random_operand(rng), _random_operand(rng)
        op = rng.choice("+-")
        if op == "-" and a < b:
            a, b = b, a
        if is_held_out(a, op, b) == held_out:
            answer = a + b if op == "+" else a - b
            return f"{a}{op}{b}=", str(answer)


def held_out_problems(n: int, seed: int = 1234) -> list[tuple[str, str]]:
    """`n` distinct held-out (prompt, answer) pairs, deterministic by seed."""
    rng = random.Random(seed)
    seen: dict[str, str] = {}
    while len(seen) < n:
        prompt, answer = random_problem(rng, held_out=True)
        seen.setdefault(prompt, answer)
    return list(seen.items())


def zero_padded(problem: tuple[str, str]) -> tuple[str, str]:
    """("417+85=", "502") -> ("417+085=", "0502"): operands to 3 digits, the answer to 4.

    With every digit at a fixed offset from the ``=``, each answer digit finds its operand
    digits at the same relative positions wherever the problem sits in a long prompt.
    """
    prompt, answer = problem
    op = "+" if "+" in prompt else "-"
    a, b = prompt[:-1].split(op)
    return f"{int(a):03d}{op}{int(b):03d}=", f"{int(answer):04d}"


def solved_problems(rng: random.Random, shots: int, padded: bool = False) -> list[tuple[str, str]]:
    """`shots` training-split (prompt, answer) pairs, `zero_padded` when `padded`."""
    problems = [random_problem(rng) for _ in range(shots)]
    return [zero_padded(p) for p in problems] if padded else problems


def solved_examples(rng: random.Random, shots: int, padded: bool = False) -> str:
    """`shots` solved training-split problems joined by spaces ("12+5=17 417-85=332"): a
    few-shot context to put before a prompt; `padded` writes them `zero_padded`."""
    return " ".join(p + a for p, a in solved_problems(rng, shots, padded))


def with_context(rng: random.Random, prompt: str, shots: int, padded: bool = False) -> str:
    """`prompt` after a context of `shots` solved training problems (unchanged when 0)."""
    return f"{solved_examples(rng, shots, padded)} {prompt}" if shots else prompt


def held_out_few_shot(
    n: int, shots: int, seed: int = 1234, context_seed: int = 4321, padded: bool = False
) -> list[tuple[str, str]]:
    """`held_out_problems(n, seed)`, each prompt after its own `shots`-problem context.

    The contexts are deterministic by `context_seed`, so every run sees the same prompts;
    `padded` writes every problem, and the expected answers, `zero_padded`.
    """
    rng = random.Random(context_seed)
    problems = held_out_problems(n, seed)
    if padded:
        problems = [zero_padded(p) for p in problems]
    return [(with_context(rng, p, shots, padded), a) for p, a in problems]


def random_sentence(rng: random.Random) -> str:
    """A short English sentence from the grammar."""

    def noun_phrase() -> str:
        words = [rng.choice(DETERMINERS)]
        if rng.random() < 0.6:
            words.append(rng.choice(ADJECTIVES))
        words.append(rng.choice(NOUNS))
        return " ".join(words)

    sentence = f"{noun_phrase()} {rng.choice(VERBS)} {noun_phrase()}"
    if rng.random() < 0.4:
        sentence += " " + rng.choice(PLACES)
    return sentence + "."


def training_texts(rng: random.Random, sentence_fraction: float = 0.15) -> Iterator[str]:
    """An endless stream of training texts: mostly problems with answers, some sentences."""
    while True:
        if rng.random() < sentence_fraction:
            yield random_sentence(rng)
        else:
            prompt, answer = random_problem(rng)
            yield prompt + answer


def build_tokenizer(seed: int = 0, corpus_size: int = 5000) -> PreTrainedTokenizerFast:
    """Train the character-level tokenizer on a sample of the corpus."""
    rng = random.Random(seed)
    stream = training_texts(rng)
    corpus = [next(stream) for _ in range(corpus_size)]
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tokenizer.train_from_iterator(corpus, trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        mask_token=MASK,
        unk_token=UNK,
        model_max_length=64,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Save the tokenizer so that ``AutoTokenizer.from_pretrained(folder)`` reads it."""
    tokenizer.save_pretrained(folder)
