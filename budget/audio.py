"""The duration of uploaded audio, for transcription priced by the second."""

from __future__ import annotations

import io
import math
from decimal import Decimal

import mutagen


def audio_duration_seconds(data: bytes) -> Decimal | None:
    """Duration in seconds of audio file bytes (mp3, m4a, ogg, flac, wav); None if unreadable."""
    try:
        audio = mutagen.File(io.BytesIO(data))
        length = audio.info.length if audio is not None else None
    except Exception:  # mutagen raises many kinds of errors on damaged files
        return None
    if not isinstance(length, int | float) or not math.isfinite(length) or length <= 0:
        return None
    # str() keeps the float's shortest decimal form (0.1 stays 0.1).
    return Decimal(str(length))
