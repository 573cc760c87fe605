"""Reading the length of uploaded audio in every format OpenAI accepts."""

from decimal import Decimal

import pytest

from budget.audio import DEMUX_PACKET_LIMIT, audio_duration_seconds, billed_seconds
from tests.audio_files import FORMATS, encode, webm_recording


@pytest.mark.parametrize("extension", sorted(FORMATS))
def test_length_of_every_accepted_format(extension: str) -> None:
    """A 2.5 s tone reads as 2.5 s (Opus in WebM: within its 20 ms packet)."""
    seconds = audio_duration_seconds(encode(extension, 2.5))
    assert seconds is not None
    assert Decimal("2.5") <= seconds < Decimal("2.52")
    assert billed_seconds(seconds, measured=True) == 3


def test_browser_recording_without_duration_is_read_from_its_packets() -> None:
    """MediaRecorder WebM states no duration; the packets' timestamps give 13 s."""
    data = webm_recording(13.0)
    seconds = audio_duration_seconds(data)
    assert seconds is not None and Decimal(13) <= seconds < Decimal("13.02")
    assert billed_seconds(seconds, measured=True) == 13
    assert DEMUX_PACKET_LIMIT > 13 * 50  # 20 ms packets


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not audio at all" * 10,
        b"#EXTM3U\n#EXT-X-TARGETDURATION:10\nhttp://127.0.0.1:9/x.ts\n",  # never probed
        b"RIFF\x00\x00\x00\x00WAVEjunk",
        b"\x1a\x45\xdf\xa3" + b"\x00" * 64,
        b"OggS" + b"\x00" * 64,
        b"ID3\x04\x00\x00\x00\x00\x00\x00",
    ],
)
def test_unreadable_files_have_no_length(data: bytes) -> None:
    """Damaged files and formats OpenAI does not accept give None, never an error."""
    assert audio_duration_seconds(data) is None


def test_billed_seconds_round_up_to_whole_seconds() -> None:
    """OpenAI bills whole seconds rounded up (8.47 -> 9), at least one; nothing for nothing."""
    assert billed_seconds(Decimal("8.47")) == 9
    assert billed_seconds(Decimal("0.2")) == 1
    assert billed_seconds(Decimal(0)) == 0
    assert billed_seconds(Decimal("13.02"), measured=True) == 13
    assert billed_seconds(Decimal("13.04"), measured=True) == 14
