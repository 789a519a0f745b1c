"""Label -> several natural captions.

Captions are what the text encoder sees in training, so one label appears under varied
phrasings: the label itself, the builder's own descriptions (e.g. "a fiddle playing" for
"violin"), template phrasings ("dog barking in the distance"), and word-level synonyms
("puppy barking"). Choice is seeded per label, so the same label always gets the same list.

Optionally, an OpenAI-compatible chat endpoint rewrites the list (`captions.llm`); answers
are cached in a JSON file (tracked by DVC) so a rebuild never calls the endpoint twice for
the same label.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from flam_core.config import CaptionParams, LlmCaptionParams
from flam_core.errors import ExternalToolError
from flam_core.utils import atomic_write_text, stable_seed

TEMPLATES = (
    "the sound of {label}",
    "{label} in the distance",
    "{label} nearby",
    "{label} can be heard",
    "a recording of {label}",
    "{label} close to the microphone",
    "{label} in a quiet room",
    "{label} outdoors",
    "{label} in the background",
    "someone recorded {label}",
)
BACKGROUND_TEMPLATES = (
    "{label} in the background",
    "constant {label}",
    "steady {label}",
    "an ambience of {label}",
    "{label} all the time",
)

# word -> alternatives that keep the meaning in the labels this library uses
SYNONYMS: dict[str, tuple[str, ...]] = {
    "dog": ("puppy", "hound"),
    "barking": ("barks", "yapping"),
    "cat": ("kitten",),
    "meowing": ("meows", "mewing"),
    "car": ("vehicle", "automobile"),
    "a person": ("someone", "a human"),
    "man": ("male",),
    "woman": ("female",),
    "baby": ("infant", "toddler"),
    "crying": ("wailing", "sobbing"),
    "laughing": ("giggling", "chuckling"),
    "door": ("doorway",),
    "knocking": ("rapping", "banging"),
    "footsteps": ("steps", "walking"),
    "ringing": ("rings", "chiming"),
    "clapping": ("applauding",),
    "water": ("a stream",),
    "running": ("flowing",),
    "siren": ("alarm siren", "emergency siren"),
    "bell": ("chime",),
    "bird": ("songbird",),
    "birds": ("songbirds",),
    "chirping": ("singing", "tweeting"),
    "typing": ("keystrokes",),
    "coughing": ("coughs",),
    "speaking": ("talking",),
    "saying": ("pronouncing",),
    "glass": ("a window",),
    "breaking": ("shattering", "smashing"),
    "engine": ("motor",),
    "wind": ("gusts of wind",),
    "rain": ("rainfall",),
}
_SYNONYM_PATTERN = re.compile(
    r"\b(" + "|".join(map(re.escape, sorted(SYNONYMS, key=len, reverse=True))) + r")\b"
)


def _synonym_variants(label: str, rng: np.random.Generator) -> list[str]:
    """Copies of `label` with one word or phrase swapped for a synonym."""
    variants = []
    for match in _SYNONYM_PATTERN.finditer(label):
        for alternative in SYNONYMS[match.group()]:
            variants.append(label[: match.start()] + alternative + label[match.end() :])
    rng.shuffle(variants)
    return variants


def template_captions(label: str, kind: str, extra: Iterable[str], per_label: int, seed: int) -> list[str]:
    """`per_label` distinct captions: the label, builder captions, synonyms, templates."""
    rng = np.random.default_rng(stable_seed(seed, "captions", label))
    templates = list(BACKGROUND_TEMPLATES if kind == "background" else TEMPLATES)
    rng.shuffle(templates)
    candidates = [label, *extra, *_synonym_variants(label, rng)]
    candidates += [template.format(label=label) for template in templates]
    unique: list[str] = []
    for caption in candidates:
        caption = " ".join(caption.split()).lower()
        if caption and caption not in unique:
            unique.append(caption)
    return unique[:per_label]


class LlmCaptioner:
    """Rewrites caption lists through an OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(self, params: LlmCaptionParams, cache_root: Path = Path()) -> None:
        self.params = params
        self.cache_path = cache_root / params.cache_path
        self.cache: dict[str, list[str]] = (
            json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}
        )
        self._dirty = False

    def rewrite(self, label: str, captions: list[str], n: int) -> list[str]:
        key = f"{self.params.model}\x1f{label}\x1f{n}"
        if key not in self.cache:
            self.cache[key] = self._ask(label, captions, n)
            self._dirty = True
        return self.cache[key]

    def save(self) -> None:
        if self._dirty:
            atomic_write_text(self.cache_path, json.dumps(self.cache, indent=1, sort_keys=True))
            self._dirty = False

    def _ask(self, label: str, captions: list[str], n: int) -> list[str]:
        prompt = (
            f"Write {n} short, varied, natural English captions (2 to 13 words each) describing "
            f"a sound recording of: {label}. Examples: {json.dumps(captions)}. Answer with a JSON "
            "list of strings only."
        )
        body = json.dumps(
            {
                "model": self.params.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0.7,
            }
        ).encode()
        request = urllib.request.Request(
            self.params.endpoint.rstrip("/") + "/chat/completions",  # type: ignore[union-attr]
            data=body,
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {os.environ.get(self.params.api_key_env, '')}",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.params.timeout_s) as response:
                content = json.load(response)["choices"][0]["message"]["content"]
            rewritten = json.loads(content)
        except (urllib.error.URLError, TimeoutError, KeyError, IndexError, json.JSONDecodeError) as exc:
            raise ExternalToolError(f"caption endpoint {self.params.endpoint}: {exc}") from exc
        words_ok = [c.strip() for c in rewritten if isinstance(c, str) and 2 <= len(c.split()) <= 13]
        if not words_ok:
            raise ExternalToolError(f"caption endpoint returned no usable caption for {label!r}: {content!r}")
        return [c.lower() for c in words_ok[:n]]


def caption_table(
    labels: dict[str, tuple[str, tuple[str, ...]]], params: CaptionParams, cache_root: Path = Path()
) -> dict[str, list[str]]:
    """label -> captions for every `label: (kind, builder captions)`; the label comes first."""
    table = {
        label: template_captions(label, kind, extra, params.per_label, params.seed)
        for label, (kind, extra) in sorted(labels.items())
    }
    if params.llm.enabled:
        captioner = LlmCaptioner(params.llm, cache_root)
        try:
            for label, captions in table.items():
                rewritten = captioner.rewrite(label, captions, params.per_label - 1)
                table[label] = [label, *[c for c in rewritten if c != label]][: params.per_label]
        finally:
            captioner.save()
    return table
