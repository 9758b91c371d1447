"""The mini_synth phone set and the map from espeak-ng mnemonics to it (``phones.tsv`` beside this file).

39 ARPAbet-like phones (CMUdict's set, lower case) plus ``sil``. The map strips stress marks first, merges
accent variants and maps pauses to ``sil``; a mnemonic missing from the table raises `UnknownPhoneError`
naming the mnemonic and the voice, so that a new voice can never add labels silently.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

__all__ = ["PHONES", "SIL", "UnknownPhoneError", "load_phone_map", "to_phone", "PHONE_MAP_PATH"]

PHONE_MAP_PATH = Path(__file__).with_name("phones.tsv")
SIL = "sil"
PHONES: tuple[str, ...] = (SIL,) + tuple(
    "aa ae ah ao aw ay b ch d dh eh er ey f g hh ih iy jh k l m n ng ow oy p r s sh t th uh uw v w y z zh".split())
_STRESS = "',%="


class UnknownPhoneError(ValueError):
    """An espeak-ng mnemonic that phones.tsv does not map."""


@lru_cache(maxsize=None)
def load_phone_map(path: str = str(PHONE_MAP_PATH)) -> dict[str, str]:
    """Read the TSV (``#`` comments; ``mnemonic<TAB>phone[<TAB>comment]``); checks every target is in PHONES."""
    out: dict[str, str] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise ValueError(f"{path}:{lineno}: expected 'mnemonic<TAB>phone[<TAB>comment]', got {line!r}")
        mnem, phone = fields[0], fields[1]
        if phone not in PHONES:
            raise ValueError(f"{path}:{lineno}: phone {phone!r} is not in the phone set {' '.join(PHONES)}")
        if mnem in out:
            raise ValueError(f"{path}:{lineno}: duplicate mnemonic {mnem!r}")
        out[mnem] = phone
    return out


def to_phone(mnemonic: str, voice: str) -> str:
    """Map one espeak-ng mnemonic (stress marks allowed) to the phone set, or raise `UnknownPhoneError`."""
    table = load_phone_map()
    base = mnemonic.lstrip(_STRESS) or mnemonic
    try:
        return table[base]
    except KeyError:
        raise UnknownPhoneError(
            f"espeak-ng phoneme {mnemonic!r} (voice {voice!r}) is not in {PHONE_MAP_PATH}; add a line mapping "
            f"{base!r} to one of: {' '.join(PHONES)}") from None
