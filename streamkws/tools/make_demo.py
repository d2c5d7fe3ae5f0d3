"""Rebuild the bundled demo recording (``streamkws run --source demo``) from real clips.

Ten keywords and three other words from Speech Commands speakers held out of the default
model's training (its speaker-disjoint validation split), over a quiet real noise bed.

    python -m streamkws.tools.make_demo --data ../shared/data
"""

from __future__ import annotations

from pathlib import Path

from streamkws.audio.wav import load_audio
from streamkws.data import KEYWORDS, load_dataset, load_noise, speaker_split
from streamkws.errors import ArgumentParser
from streamkws.tools.streams import build_stream, speech_contrast_db, write_labels, write_wav

OUT = Path(__file__).resolve().parents[1] / "data"
UNKNOWN_SLOTS = (2, 6, 10)  # where other words interrupt the keywords
ATTRIBUTION = "Speech Commands dataset, P. Warden, 2018, arXiv:1804.03209, CC BY 4.0"


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m streamkws.tools.make_demo",
                        description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=0, help="the split seed of the default model")
    args = ap.parse_args(argv)
    _, val = speaker_split(load_dataset(args.data / "speech_commands_v2_real"), 0.15, args.seed)
    by_word: dict[str, list] = {}
    for it in val.items:
        by_word.setdefault(it.word, []).append(it)
    others = sorted(w for w in by_word if w not in KEYWORDS and w != "_silence_")
    order = list(KEYWORDS)
    for slot, word in zip(UNKNOWN_SLOTS, others[:: max(1, len(others) // 3)], strict=False):
        order.insert(slot, word)
    clips, used = [], set()
    for word in order:
        # One clip per word, each from a different speaker, so the demo is not one voice.
        item = next(it for it in by_word[word] if it.speaker not in used
                    and speech_contrast_db(load_audio(it.path)) >= 25.0)
        used.add(item.speaker)
        clips.append((word, item.path))
    noise = [n for n in load_noise(args.data / "noise")][:1]  # doing_the_dishes
    audio, placed = build_stream(clips, noise, gap_s=(0.9, 1.3), snr_db=25.0, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_wav(args.out / "demo.wav", audio)
    write_labels(args.out / "demo.csv", placed, set(KEYWORDS))
    lines = ["# The demo recording", "",
             f"`demo.wav` ({len(audio) / 16000:.1f} s, 16 kHz mono) is built by "
             "`python -m streamkws.tools.make_demo` from these real clips of the Speech "
             "Commands test set (speakers held out of the default model's training), "
             "over the `doing_the_dishes` background-noise recording at 25 dB SNR. "
             "`demo.csv` lists where each keyword is.", "",
             f"Attribution: {ATTRIBUTION}.", "",
             "| time (s) | word | source clip |", "|---|---|---|"]
    lines += [f"| {p.start:.2f}-{p.end:.2f} | {p.word} | `{Path(p.source).parent.name}/"
              f"{Path(p.source).name}` |" for p in placed]
    (args.out / "DEMO.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'demo.wav'}: {len(audio) / 16000:.1f} s, {len(placed)} words")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
