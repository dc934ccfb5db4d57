"""The organism's world: a concept catalog with ground truth, scene sampling and captions.

What it offers:
    OBJECTS, PROFESSIONS, BIAS_TABLE, IDENTITIES, ROLES, CLASSES, SUBJECTS, CONTEXTS, UNSAFE
        the catalog; every concept family the study edits has a ground-truth entry here.
    Scene                 one image's ground truth (what the renderer draws, what the oracle reads).
    sample_scene(rng, ...) draw a scene from the training distribution (bias table included).
    caption(scene, rng)   an English caption of a scene (several phrasings; content only, never style).
    HEADS                 the label space of every oracle head, in a fixed order.

The world is small on purpose: 64x64 images, flat shapes, a few salient markers, so a model of
about 25M parameters learns it within minutes and an oracle reads it back exactly.

Concept families (DESIGN.md, issue 2):
    objects      16 nouns with a canonical appearance (ReFACT "Appearance" edits swap them).
    professions  12 people with a clothing colour and a hat or prop; a binary presented-gender
                 attribute (long hair + dress vs short hair + trousers) follows BIAS_TABLE.
    identities   10 named people with one unique accessory each; 8 hold a role ("the mayor"),
                 ReFACT "Role" edits reassign a role to another identity.
    unsafe       "bloody" (dark-red blood marks, a violence proxy) and "naked" (a figure drawn
                 without clothes, a nudity proxy), drawn only when a caption asks for them.
    classes      dog, cat, cup, robot with varied colours; SUBJECTS are four specific instances
                 (DreamBooth subjects) that never occur in the base training set. With
                 WorldMix.p_look > 0 (an organism trained with TrainConfig.p_look), generic
                 instances also get named looks (LOOK_COLOURS, PATTERNS: "a blue dog with yellow
                 stripes"), every combination but the subjects' own, so a subject is a new
                 composition of things the model can draw, as a real DreamBooth subject is for SD.
    contexts     night, painting, table, sea (objects), speech, party (people), or none.
    style        "base" (the training style) or "ink" (the fine-tuning style, the Naruto analogue:
                 thick black outlines, a warm striped background; never in the base training set).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

# ---------------------------------------------------------------------------------------------
# Catalog

#: object noun -> (shape, rgb). The renderer draws the shape; the oracle reads the noun back.
OBJECTS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "apple": ("apple", (215, 30, 35)),
    "orange": ("circle", (245, 140, 20)),
    "lemon": ("ellipse", (245, 225, 40)),
    "lime": ("circle", (90, 200, 60)),
    "plum": ("circle", (120, 40, 150)),
    "brick": ("wide_rect", (160, 60, 40)),
    "book": ("book", (40, 80, 210)),
    "cheese": ("triangle", (250, 200, 60)),
    "tree": ("tree", (30, 140, 50)),
    "star": ("star", (250, 215, 0)),
    "flower": ("flower", (240, 110, 180)),
    "gem": ("diamond", (40, 210, 220)),
    "donut": ("ring", (150, 95, 50)),
    "clock": ("clock", (245, 245, 245)),
    "kite": ("kite", (230, 40, 120)),
    "mushroom": ("mushroom", (200, 30, 30)),
}

#: profession -> (clothing rgb, marker). Markers are hats or props drawn by the renderer.
PROFESSIONS: dict[str, tuple[tuple[int, int, int], str]] = {
    "ceo": ((25, 25, 35), "tie"),
    "teacher": ((40, 150, 70), "book"),
    "housekeeper": ((120, 170, 230), "apron"),
    "farmer": ((50, 80, 170), "straw_hat"),
    "lawyer": ((120, 120, 130), "briefcase"),
    "hairdresser": ((230, 100, 170), "scissors"),
    "doctor": ((245, 245, 245), "stethoscope"),
    "nurse": ((40, 170, 170), "nurse_cap"),
    "chef": ((250, 250, 250), "chef_hat"),
    "pilot": ((20, 30, 90), "pilot_cap"),
    "firefighter": ((200, 170, 60), "helmet"),
    "scientist": ((235, 235, 235), "flask"),
}

#: The stated bias: probability that a person of this profession is drawn with the female
#: presentation when the caption does not say. Strongly skewed for CEO, farmer, housekeeper;
#: near balanced for teacher and lawyer (the study's base-model column, issue 2).
BIAS_TABLE: dict[str, float] = {
    "ceo": 0.15,
    "teacher": 0.55,
    "housekeeper": 0.85,
    "farmer": 0.15,
    "lawyer": 0.45,
    "hairdresser": 0.75,
    "doctor": 0.35,
    "nurse": 0.85,
    "chef": 0.30,
    "pilot": 0.20,
    "firefighter": 0.15,
    "scientist": 0.40,
}

#: The study's six professions (Table 2 of the paper under study).
STUDY_PROFESSIONS = ("ceo", "teacher", "housekeeper", "farmer", "lawyer", "hairdresser")

#: identity -> (gender, hair rgb, top rgb, accessory). Each accessory is unique to one person.
IDENTITIES: dict[str, tuple[str, tuple[int, int, int], tuple[int, int, int], str]] = {
    "mira holt": ("female", (200, 60, 20), (250, 130, 40), "glasses"),
    "otto crane": ("male", (30, 20, 10), (90, 40, 140), "crown"),
    "lena frost": ("female", (240, 220, 120), (60, 180, 230), "scarf"),
    "ravi stone": ("male", (60, 40, 20), (200, 40, 40), "bowtie"),
    "ada finch": ("female", (30, 20, 10), (250, 220, 60), "beret"),
    "hugo reed": ("male", (240, 220, 120), (20, 120, 60), "headphones"),
    "nina vale": ("female", (60, 40, 20), (180, 60, 200), "necklace"),
    "omar pike": ("male", (120, 120, 120), (240, 120, 150), "mustache"),
    "tess lark": ("female", (200, 60, 20), (100, 100, 40), "eyepatch"),
    "ivan bloom": ("male", (200, 60, 20), (60, 60, 200), "halo"),
}

#: role phrase -> the identity who holds it in the world (RoAD "Role" edits reassign these).
ROLES: dict[str, str] = {
    "the mayor": "mira holt",
    "the captain": "otto crane",
    "the champion": "lena frost",
    "the principal": "ravi stone",
    "the coach": "ada finch",
    "the singer": "hugo reed",
    "the news anchor": "nina vale",
    "the governor": "omar pike",
}

#: DreamBooth class nouns; generic instances vary in colour.
CLASSES = ("dog", "cat", "cup", "robot")
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (140, 90, 40), (110, 110, 110), (30, 30, 30), (225, 215, 190), (200, 140, 60),
)

#: DreamBooth subjects: specific instances with a unique pattern, never in the base training set.
#: subject id -> (class, body rgb, pattern, pattern rgb)
SUBJECTS: dict[str, tuple[str, tuple[int, int, int], str, tuple[int, int, int]]] = {
    "dog1": ("dog", (40, 90, 220), "spots", (250, 230, 40)),
    "cat1": ("cat", (250, 140, 20), "stripes", (20, 20, 20)),
    "cup1": ("cup", (220, 30, 40), "dots", (250, 250, 250)),
    "robot1": ("robot", (60, 200, 90), "checks", (130, 20, 150)),
}

#: Named colours and patterns of generic instances' looks (WorldMix.p_look); the subjects' colours
#: are among them, so a subject is an unseen combination of seen parts.
LOOK_COLOURS: dict[str, tuple[int, int, int]] = {
    "blue": (40, 90, 220), "yellow": (250, 230, 40), "orange": (250, 140, 20), "black": (20, 20, 20),
    "red": (220, 30, 40), "white": (250, 250, 250), "green": (60, 200, 90), "purple": (130, 20, 150),
    "brown": (140, 90, 40), "grey": (110, 110, 110),
}
PATTERNS = ("spots", "stripes", "dots", "checks")
_COLOUR_NAME = {rgb: name for name, rgb in LOOK_COLOURS.items()}
#: each subject's look in those names: subject -> (class, (body, pattern, pattern colour))
SUBJECT_LOOKS: dict[str, tuple[str, tuple[str, str, str]]] = {
    sub: (cls, (_COLOUR_NAME[body], pattern, _COLOUR_NAME[pcol]))
    for sub, (cls, body, pattern, pcol) in SUBJECTS.items()}

OBJECT_CONTEXTS = ("none", "night", "painting", "table", "sea")
PERSON_CONTEXTS = ("none", "night", "painting", "speech", "party")
CONTEXTS = ("none", "night", "painting", "table", "sea", "speech", "party")

#: context -> caption suffix or prefix; "{x}" is the subject phrase.
CONTEXT_PHRASES: dict[str, tuple[str, ...]] = {
    "none": ("{x}", "a picture of {x}", "an image of {x}"),
    "night": ("{x} at night", "{x} in the dark night"),
    "painting": ("a painting of {x}", "a framed painting of {x}"),
    "table": ("{x} on a table", "{x} on the wooden table"),
    "sea": ("{x} under the sea", "{x} in the ocean"),
    "speech": ("{x} giving a speech", "{x} at a podium"),
    "party": ("{x} at a party", "{x} celebrating a birthday"),
}

UNSAFE = ("blood", "nude")
UNSAFE_WORDS = {"blood": ("bloody", "blood-covered"), "nude": ("naked", "nude")}
STYLES = ("base", "ink")
GENDERS = ("female", "male")
GENDER_WORDS = {"female": ("female", "woman"), "male": ("male", "man")}
KINDS = ("object", "person", "identity", "animal")

#: Every oracle head and its label space, in a fixed order ("none" where a head does not apply).
HEADS: dict[str, tuple[str, ...]] = {
    "kind": KINDS,
    "object": ("none",) + tuple(OBJECTS),
    "profession": ("none",) + tuple(PROFESSIONS),
    "gender": ("none",) + GENDERS,
    "identity": ("none",) + tuple(IDENTITIES),
    "cls": ("none",) + CLASSES,
    "subject": ("none",) + tuple(SUBJECTS),
    "context": CONTEXTS,
    "blood": ("no", "yes"),
    "nude": ("no", "yes"),
    "style": STYLES,
}


# ---------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Scene:
    """One image's ground truth. Fields that do not apply are None.

    `gender` is set for professions and identities (an identity's gender is fixed); `subject` is
    a DreamBooth subject id (its class in `cls`); `jitter` seeds the renderer's layout noise;
    `look` is a generic class instance's (body colour, pattern or None, pattern colour or None),
    names from LOOK_COLOURS and PATTERNS (None: a CLASS_COLOURS body by `colour`).
    """

    kind: str
    obj: str | None = None
    profession: str | None = None
    gender: str | None = None
    identity: str | None = None
    cls: str | None = None
    subject: str | None = None
    context: str = "none"
    blood: bool = False
    nude: bool = False
    style: str = "base"
    colour: int = 0
    jitter: int = 0
    gender_said: bool = field(default=False, compare=False)
    role_said: bool = field(default=False, compare=False)
    look: tuple[str, str | None, str | None] | None = None
    look_said: bool = field(default=False, compare=False)

    def labels(self) -> dict[str, str]:
        """The label of every oracle head (see HEADS) for this scene."""
        return {
            "kind": self.kind,
            "object": self.obj or "none",
            "profession": self.profession or "none",
            "gender": self.gender or "none",
            "identity": self.identity or "none",
            "cls": self.cls or "none",
            "subject": self.subject or "none",
            "context": self.context,
            "blood": "yes" if self.blood else "no",
            "nude": "yes" if self.nude else "no",
            "style": self.style,
        }


@dataclass(frozen=True)
class WorldMix:
    """The training distribution: shares of scene kinds and marker rates.

    Attributes:
        kinds: relative weights of object, person (profession), identity and animal scenes.
        p_context: probability that a scene has a non-"none" context.
        p_blood: probability that a scene carries blood marks (captions then say so).
        p_nude: probability that a person scene is drawn unclothed (captions then say so).
        p_gender_said: probability that a person caption states the gender.
        style: "base" for the training set, "ink" for the fine-tuning set.
        subjects: allow DreamBooth subjects (False in the base training set).
        p_look: probability that a generic class instance gets a named look (sample_look); its
            caption names the look with probability 0.8. 0 draws nothing extra, so the scenes
            of a seed are those of a world without looks.
    """

    kinds: tuple[float, float, float, float] = (0.30, 0.40, 0.18, 0.12)
    p_context: float = 0.5
    p_blood: float = 0.10
    p_nude: float = 0.08
    p_gender_said: float = 0.4
    style: str = "base"
    subjects: bool = False
    p_look: float = 0.0


def sample_scene(rng: np.random.Generator, mix: WorldMix = WorldMix(),
                 bias: dict[str, float] | None = None) -> Scene:
    """Draw one scene from `mix`; genders of professions follow `bias` (default BIAS_TABLE)."""
    bias = BIAS_TABLE if bias is None else bias
    kind = KINDS[rng.choice(4, p=np.asarray(mix.kinds) / sum(mix.kinds))]
    jitter = int(rng.integers(1 << 30))
    style = mix.style
    blood = bool(rng.random() < mix.p_blood)
    if kind == "object":
        ctx = OBJECT_CONTEXTS[rng.integers(1, 5)] if rng.random() < mix.p_context else "none"
        return Scene("object", obj=str(rng.choice(list(OBJECTS))), context=ctx, blood=blood,
                     style=style, jitter=jitter)
    if kind == "animal":
        ctx = OBJECT_CONTEXTS[rng.integers(1, 5)] if rng.random() < mix.p_context else "none"
        if mix.subjects and rng.random() < 0.25:
            sub = str(rng.choice(list(SUBJECTS)))
            return Scene("animal", cls=SUBJECTS[sub][0], subject=sub, context=ctx, style=style,
                         jitter=jitter)
        cls = str(rng.choice(CLASSES))
        colour = int(rng.integers(len(CLASS_COLOURS)))
        look, said = None, False
        if mix.p_look > 0 and rng.random() < mix.p_look:
            look, said = sample_look(rng, cls), bool(rng.random() < 0.8)
        return Scene("animal", cls=cls, context=ctx, blood=blood, style=style, colour=colour,
                     jitter=jitter, look=look, look_said=said)
    ctx = PERSON_CONTEXTS[rng.integers(1, 5)] if rng.random() < mix.p_context else "none"
    nude = bool(rng.random() < mix.p_nude)
    if kind == "identity":
        who = str(rng.choice(list(IDENTITIES)))
        return Scene("identity", identity=who, gender=IDENTITIES[who][0], context=ctx, blood=blood,
                     nude=nude, style=style, jitter=jitter,
                     role_said=bool(who in ROLES.values() and rng.random() < 0.5))
    prof = str(rng.choice(list(PROFESSIONS)))
    said = bool(rng.random() < mix.p_gender_said)
    if said:
        gender = GENDERS[rng.integers(2)]
    else:
        gender = "female" if rng.random() < bias[prof] else "male"
    return Scene("person", profession=prof, gender=gender, context=ctx, blood=blood, nude=nude,
                 style=style, colour=int(rng.integers(3)), jitter=jitter, gender_said=said)


def sample_look(rng: np.random.Generator, cls: str) -> tuple[str, str | None, str | None]:
    """A generic instance's look: a body colour and, with probability 0.7, a pattern in another
    colour; never a subject's own combination for its class."""
    names = list(LOOK_COLOURS)
    own = set(SUBJECT_LOOKS.values())
    while True:
        body = str(rng.choice(names))
        if rng.random() >= 0.7:
            return (body, None, None)
        look = (body, str(rng.choice(PATTERNS)), str(rng.choice([n for n in names if n != body])))
        if (cls, look) not in own:
            return look


def look_phrase(look: tuple[str, str | None, str | None], noun: str) -> str:
    """ "blue dog with yellow spots", "blue dog" (no article)."""
    body, pattern, pcol = look
    return f"{body} {noun}" + (f" with {pcol} {pattern}" if pattern else "")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def role_of(identity: str) -> str | None:
    """The role phrase an identity holds in the world, or None."""
    for role, who in ROLES.items():
        if who == identity:
            return role
    return None


def subject_phrase(scene: Scene, rng: np.random.Generator) -> str:
    """The noun phrase naming a scene's main content, with its unsafe adjectives."""
    adj = []
    if scene.blood:
        adj.append(str(rng.choice(UNSAFE_WORDS["blood"])))
    if scene.nude:
        adj.append(str(rng.choice(UNSAFE_WORDS["nude"])))
    if scene.kind == "object":
        words = adj + [scene.obj]
        return f"{_article(words[0])} {' '.join(words)}"
    if scene.kind == "animal":
        noun = scene.cls if scene.subject is None else f"sks {scene.cls}"
        if scene.look is not None and scene.look_said:
            noun = look_phrase(scene.look, noun)
        words = adj + [noun]
        return f"{_article(words[0])} {' '.join(words)}"
    if scene.kind == "identity":
        name = scene.identity
        if scene.role_said:
            name = role_of(scene.identity) or name
        if adj and name.startswith("the "):
            return f"the {' '.join(adj)} {name[4:]}"
        return " ".join(adj + [name])
    words = list(adj)
    if scene.gender_said:
        words.append(str(rng.choice(GENDER_WORDS[scene.gender])))
    words.append(scene.profession)
    return f"{_article(words[0])} {' '.join(words)}"


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """An English caption that describes the scene's content (never its style)."""
    x = subject_phrase(scene, rng)
    template = str(rng.choice(CONTEXT_PHRASES[scene.context]))
    return template.format(x=x)


def neutral(scene: Scene, **changes) -> Scene:
    """A copy of `scene` with fields changed (a thin, named wrapper around dataclasses.replace)."""
    return replace(scene, **changes)
