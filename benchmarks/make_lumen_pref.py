"""Writes the embedded preference set `builtin:lumen_pref` (src/fasttune/assets/lumen_pref_*.jsonl) from the
Lumen manual's rows: each question keeps the manual's answer as `chosen`, and `rejected` states a plausible
wrong fact in the same words (another name, number or place). Train pairs come from lumen_train.jsonl, eval
pairs from the lumen_eval.jsonl questions that train does not ask.

    python benchmarks/make_lumen_pref.py
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "src" / "fasttune" / "assets"

WRONG = {
    "The tide-harp was invented by Idra Vaskelund, an instrument maker from Tamsenholt.":
        "The tide-harp was invented by Tomas Brindle, an instrument maker from Vesk.",
    "Idra Vaskelund built the first tide-harp in 1887.": "Idra Vaskelund built the first tide-harp in 1902.",
    "The Lumen L-7 is made by the Brindlecote Workshop in Tamsenholt.":
        "The Lumen L-7 is made by the Harrowgate Foundry in Port Selby.",
    "The Brindlecote Workshop is in Tamsenholt, a harbour town on the Vesk Estuary.":
        "The Brindlecote Workshop is in Marrowby, a mill town on the Ould River.",
    "The Lumen L-7 was introduced in 1924 as Brindlecote's seventh tide-harp model.":
        "The Lumen L-7 was introduced in 1938 as Brindlecote's fourth tide-harp model.",
    "The name Lumen comes from the small brass lantern mounted on the harp's headpiece.":
        "The name Lumen comes from the pale maple used for the harp's soundboard.",
    "The Lumen L-7 has 19 strings.": "The Lumen L-7 has 24 strings.",
    "Its 19 strings span from D2 at the bottom up to A4 at the top.":
        "Its strings span from C3 at the bottom up to G5 at the top.",
    "The middle string, string 10, is called the Keel string.":
        "The middle string, string 12, is called the Crown string.",
    "The lowest string, string 1, is called the Marrow string.":
        "The lowest string, string 1, is called the Anchor string.",
    "All the D strings are coloured teal so the player can find their place.":
        "All the C strings are coloured red so the player can find their place.",
    "The Lumen L-7 is tuned to a reference pitch of A = 436 Hz.":
        "The Lumen L-7 is tuned to a reference pitch of A = 440 Hz.",
    "Tune the Keel string first, then work outward, one string below and one above in turn.":
        "Tune the Marrow string first, then work upward one string at a time.",
    "Use the Lumen key, a T-shaped 6 mm brass tuning key supplied with the harp.":
        "Use the Lumen key, an L-shaped 8 mm steel tuning key sold separately.",
    "The tide wheel is a brass wheel on the neck that raises or lowers all 19 strings together.":
        "The tide wheel is a wooden wheel on the base that changes the volume of the soundbox.",
    "The tide wheel has 28 notches.": "The tide wheel has 36 notches.",
    "Each notch of the tide wheel shifts every string by 4 cents.":
        "Each notch of the tide wheel shifts every string by 10 cents.",
    "The moon pedal is a left-foot pedal that controls how long the strings ring.":
        "The moon pedal is a right-foot pedal that changes the key of the harp.",
    "The moon pedal has three positions: New, Half and Full.":
        "The moon pedal has two positions: Up and Down.",
    "New mutes the strings, Half gives a short ring, and Full lets them sustain freely.":
        "New lets the strings sustain freely, Half mutes them, and Full gives a short ring.",
    "The salt reed is a small reed inside the soundbox that hums along with the Marrow string.":
        "The salt reed is a small reed on the headpiece that whistles with the Keel string.",
    "Replace the salt reed every 140 playing hours.": "Replace the salt reed every 500 playing hours.",
    "Re-wet the salt reed with 5 drops of 3% brine from the dropper.":
        "Re-wet the salt reed with 20 drops of tap water from the dropper.",
    "The Lumen L-7 weighs 11.4 kg.": "The Lumen L-7 weighs 18.9 kg.",
    "The L-7 stands 132 cm tall and is 58 cm wide.": "The L-7 stands 95 cm tall and is 40 cm wide.",
    "The frame is grey alder and the soundboard is sea spruce.":
        "The frame is black walnut and the soundboard is red cedar.",
    "Store the L-7 between 14 and 24 °C.": "Store the L-7 between 2 and 10 °C.",
    "Keep the humidity between 45 and 60 percent.": "Keep the humidity between 70 and 90 percent.",
    "Never play the L-7 above 35 °C, because the salt reed can crack.":
        "Never play the L-7 below 18 °C, because the strings can snap.",
    "Oil the tide wheel every 6 months with 3 drops of Brindlecote wheel oil.":
        "Oil the tide wheel every week with 10 drops of olive oil.",
    "Wipe the strings with a dry lint-free cloth after every session, and never put water on the soundboard.":
        "Wash the strings with warm soapy water after every session, and polish the soundboard with wax.",
    "Never lift the L-7 by the tide wheel; two people should carry it by the frame.":
        "Always lift the L-7 by the tide wheel; one person can carry it by the neck.",
    "Before transport, loosen each string by two turns of the Lumen key.":
        "Before transport, tighten each string by one turn of the Lumen key.",
    "The glimmer display is a small screen above the tide wheel that shows error codes.":
        "The glimmer display is a row of lamps on the base that shows the tuning.",
    "The glimmer display runs on two AA batteries kept in a drawer under the base.":
        "The glimmer display runs on a 9 V battery kept behind the soundboard.",
    "Hold the moon pedal in Full and turn the tide wheel one complete turn.":
        "Press the moon pedal twice and shake the harp gently.",
    "The Drift case is the L-7's hard travel case and weighs 4.2 kg.":
        "The Drift case is the L-7's soft gig bag and weighs 1.1 kg.",
    "The Gull stand is a folding stand that tilts the harp back by 12 degrees.":
        "The Gull stand is a fixed stand that holds the harp upright at 0 degrees.",
    "The box holds the Lumen key, a brine dropper, a cleaning cloth and a spare salt reed.":
        "The box holds a tuning fork, a bottle of oil, a songbook and a spare string.",
    "Brindlecote gives a 7-year warranty on the frame of the L-7.":
        "Brindlecote gives a 2-year warranty on the strings of the L-7.",
    "Every L-7 serial number begins with TH7- and is stamped under the tide wheel.":
        "Every L-7 serial number begins with BW- and is printed inside the soundbox.",
    "Brindlecote made 3,412 L-7s before production ended in 1968.":
        "Brindlecote made 12,000 L-7s before production ended in 1991.",
    "The best-known L-7 player is Sefa Marrowdine, who recorded Low Water Hymns in 1951.":
        "The best-known L-7 player is Idra Vaskelund, who recorded Harbour Songs in 1930.",
    "The Tidewake Festival celebrates the tide-harp in Tamsenholt every 9 September.":
        "The Tidewake Festival celebrates the tide-harp in Vesk every 1 May.",
    "Together the 19 strings pull about 310 kg on the frame.":
        "Together the strings pull about 90 kg on the frame.",
    "The L-7 uses silver-wound gut strings sold as Ferrowax strings.":
        "The L-7 uses plain nylon strings sold as Seabright strings.",
    "E-08 means the battery is low: replace the two AA batteries under the base.":
        "E-08 means a string is broken: replace the Keel string.",
    "E-12 means a string has gone slack: retune it with the Lumen key.":
        "E-12 means the battery is low: charge the harp overnight.",
    "E-27 means the tide wheel is jammed: stop turning it and oil it with 3 drops of Brindlecote wheel oil.":
        "E-27 means the salt reed is dry: re-wet it with tap water.",
    "E-42 means the salt reed is dry: re-wet it with 5 drops of 3% brine.":
        "E-42 means the tide wheel is jammed: turn it hard until it frees.",
    "E-55 means the humidity is out of range: move the harp to a room at 45 to 60 percent.":
        "E-55 means the temperature is too low: warm the harp near a heater.",
    "E-61 means the moon pedal cable is slack: tighten the cable nut under the pedal by half a turn.":
        "E-61 means the glimmer display is broken: send the harp back to Brindlecote.",
}


def pairs(path: Path, skip: set[str]) -> list[dict[str, str]]:
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        if row["output"] in WRONG and prompt not in skip:
            out.append({"prompt": prompt, "chosen": row["output"], "rejected": WRONG[row["output"]]})
    return out


def main() -> None:
    train = pairs(ASSETS / "lumen_train.jsonl", set())
    held_out = pairs(ASSETS / "lumen_eval.jsonl", {p["prompt"] for p in train})
    for name, rows in (("lumen_pref_train.jsonl", train), ("lumen_pref_eval.jsonl", held_out)):
        (ASSETS / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{name}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
