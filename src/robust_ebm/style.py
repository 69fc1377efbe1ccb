"""How every figure draws a method, an energy set and a training-dynamics curve: one owner of the look.

A method keeps the same colour, marker and name in every figure of every profile: the style is
keyed by the method's name in params.yaml, never by its position in a profile's list. Colours are
the Okabe-Ito colour-blind-safe palette, one hue per family (shaded within a family), and the
marker tells the members of a family apart; EB-JDAT-X reuses X's marker in EB-JDAT's hue.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

# Okabe & Ito (2008), "Color universal design": distinguishable under the common colour-vision deficiencies.
OKABE_ITO = {"black": "#000000", "orange": "#E69F00", "sky_blue": "#56B4E9", "bluish_green": "#009E73",
             "yellow": "#F0E442", "blue": "#0072B2", "vermillion": "#D55E00", "reddish_purple": "#CC79A7"}


@dataclass(frozen=True)
class MethodStyle:
    label: str      # the papers' name of the method
    family: str
    colour: str     # '#rrggbb'
    marker: str     # a filled matplotlib marker (drawn hollow for published points)


# family -> (hue, [(method key in params.yaml, label, marker), ...]); members go from dark to light
# (SHADES[family] = (first, last) mix: < 0 towards black, > 0 towards white).
FAMILIES: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "baseline": ("black", [("standard", "Standard", "o")]),
    "noise": ("sky_blue", [("noise_8", "Noise σ=8/255", "v"), ("noise_16", "Noise σ=16/255", "^"),
                           ("noise_24", "Noise σ=24/255", "<")]),
    "adversarial training": ("blue", [("pgd_at", "PGD-AT", "s"), ("trades", "TRADES", "D"), ("mart", "MART", "p"),
                                      ("mail_tr", "MAIL-TR", "h")]),
    "JEAT": ("orange", [("prejeat", "PreJEAT", ">"), ("jeat", "JEAT", "*")]),
    "JEM": ("bluish_green", [("jem", "JEM", "P"), ("jempp", "JEM++", "X"), ("sadajem", "SADA-JEM", "d")]),
    "WEAT": ("reddish_purple", [("weat_nat", "WEAT-nat", "H"), ("weat_adv", "WEAT-adv", "8")]),
    "EB-JDAT": ("vermillion", [("ebjdat_jem", "EB-JDAT-JEM", "P"), ("ebjdat_jempp", "EB-JDAT-JEM++", "X"),
                               ("ebjdat_sadajem", "EB-JDAT-SADAJEM", "d")]),
}
SHADES = {"noise": (-0.2, 0.4), "adversarial training": (-0.6, 0.0)}  # apart from each other's blues
DEFAULT_SHADES = (-0.35, 0.35)


def _mix(colour: str, t: float) -> str:
    """`colour` mixed with black (t < 0) or white (t > 0) by |t|."""
    rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    target = 255 if t > 0 else 0
    return "#" + "".join(f"{round(c + abs(t) * (target - c)):02X}" for c in rgb)


def _styles() -> dict[str, MethodStyle]:
    styles = {}
    for family, (hue, members) in FAMILIES.items():
        n = len(members)
        for i, (key, label, marker) in enumerate(members):
            first, last = SHADES.get(family, DEFAULT_SHADES)
            t = 0.0 if n == 1 else first + (last - first) * i / (n - 1)
            styles[key] = MethodStyle(label, family, _mix(OKABE_ITO[hue], t), marker)
    return styles


METHOD_STYLES: dict[str, MethodStyle] = _styles()
EXTERNAL_COLOUR = "#7F7F7F"  # published baselines we do not train (grey, hollow)
EXTERNAL_MARKERS = ("o", "s", "^", "v", "D", "p", "h", "<", ">", "*")


def method_style(method: str) -> MethodStyle:
    """The style of a method of params.yaml; a method without one is an error naming the fix."""
    try:
        return METHOD_STYLES[method]
    except KeyError:
        raise KeyError(f"method '{method}' has no figure style; add it to robust_ebm.style.FAMILIES "
                       f"(styled: {', '.join(METHOD_STYLES)})") from None


# ----------------------------------------------------------------------------- energy-histogram sets

SET_COLOURS = {"clean": OKABE_ITO["blue"], "adversarial": OKABE_ITO["vermillion"]}
# every generator of params.yaml generation.generators (a test keeps this complete)
GENERATOR_COLOURS = {"jeat_eq17": OKABE_ITO["bluish_green"], "jeat_eq16": OKABE_ITO["orange"],
                     "weat_momentum": OKABE_ITO["reddish_purple"], "santurkar_l2": OKABE_ITO["sky_blue"],
                     "jem_buffer": OKABE_ITO["black"]}
RESERVE_COLOURS = ("#999933", "#882255", "#44AA99", "#DDCC77", "#117733", "#AA4499")  # Tol 'muted'


def set_draw(name: str) -> dict:
    """Matplotlib `hist` style of a set: clean and adversarial filled, generated sets as outlines on top."""
    filled = name.partition(" (")[0] in SET_COLOURS
    return ({"histtype": "stepfilled", "alpha": 0.5} if filled else {"histtype": "step", "linewidth": 1.6}) | {
        "color": set_colour(name)}


def set_colour(name: str) -> str:
    """The fixed colour of a histogram set: 'clean', 'adversarial[ (attack)]', 'generated[ (<generator>)]'.

    A generator not in GENERATOR_COLOURS gets a reserve colour chosen by a hash of its name: the same in every
    panel and profile (two such generators may share one)."""
    kind, _, detail = name.partition(" (")
    if kind in SET_COLOURS:
        return SET_COLOURS[kind]
    if kind == "generated":
        generator = detail.rstrip(")")
        reserve = RESERVE_COLOURS[zlib.crc32(generator.encode()) % len(RESERVE_COLOURS)]
        return GENERATOR_COLOURS.get(generator, reserve)
    raise KeyError(f"histogram set '{name}' has no colour: name it 'clean', 'adversarial (...)' or "
                   "'generated (<generator>)' (robust_ebm.style.set_colour)")


# ----------------------------------------------------------------------------- training-dynamics curves

ENERGY_UNIT = "logit units"
ENERGIES = {"E_x": lambda arg: f"E({arg})", "E_xy": lambda arg: f"E({arg}, y)"}  # energy key -> its formula
BATCH_TAGS = {"clean": "clean training batch", "adv": "adversarial training batch", "sgld": "SGLD samples",
              "px": "data batch of the p(x) term", "gen": "generated batch"}


def dynamics_label(key: str, divergence_attack: str = "PGD") -> tuple[str, str]:
    """(panel title, y-axis label with unit) of a dynamics.json curve key (robust_ebm.dynamics).

    E_x/<tag>/mean        per-epoch mean energy of a training batch
    jeat/<dx|dtheta>_<E>  JEAT Fig.3's probes: Δx over the attack step, Δθ over the parameter update
    weat/dE_<x|xy>        WEAT's ΔE = E(x) − E(x*), x* = `divergence_attack`(x) on a fixed training subset
    An unknown key is its own title (a new curve of dynamics.py shows up rather than disappears).
    """
    base = key.removesuffix("/mean").removesuffix("_mean")
    group, _, name = base.partition("/")
    if group in ENERGIES and name:
        e = ENERGIES[group]("x")
        return f"{e} of the {BATCH_TAGS.get(name, name)}", f"mean {e} [{ENERGY_UNIT}]"
    if group == "jeat":
        probe, _, energy = name.partition("_")
        if energy in ENERGIES:
            e = ENERGIES[energy]
            if probe == "dx":
                return (f"Δx {e('x')} = {e('x_adv')} − {e('x')}, θ fixed",
                        f"Δx {e('x')} [{ENERGY_UNIT}]")
            if probe == "dtheta":
                return (f"Δθ {e('x')} at x_adv: after − before the update",
                        f"Δθ {e('x')} [{ENERGY_UNIT}]")
    if group == "weat" and name.startswith("dE_") and "E_" + name[len("dE_"):] in ENERGIES:
        e = ENERGIES["E_" + name[len("dE_"):]]
        return (f"WEAT Δ{e('x')} = {e('x')} − {e('x*')}, x* = {divergence_attack}",
                f"Δ{e('x')} [{ENERGY_UNIT}]")
    return key, "value"
