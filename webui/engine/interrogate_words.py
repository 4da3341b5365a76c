"""The words Interrogate CLIP picks from, by topic, and how many of each topic go into the prompt.

This project's own short lists: words that Stable Diffusion prompts use and that change the picture, not the
thousands of names of A1111's lists (no artists' names: a prompt should not imitate a living artist by default).
"""
from __future__ import annotations

MEDIUMS = (
    "a photograph", "a close-up photograph", "a black and white photograph", "a polaroid photo",
    "a film still", "an oil painting", "a watercolor painting", "an acrylic painting", "a gouache painting",
    "a pastel drawing", "a charcoal drawing", "a pencil sketch", "an ink drawing", "a line drawing",
    "a digital painting", "a digital illustration", "a 3D render", "a low poly render", "pixel art",
    "an anime drawing", "a manga panel", "a comic book illustration", "a cartoon", "a children's book illustration",
    "a vector illustration", "a flat illustration", "a poster", "a woodcut print", "a linocut", "an etching",
    "a screen print", "a mosaic", "a stained glass window", "a sculpture", "a clay figure", "a paper collage",
    "a tattoo design", "an icon", "an emoji", "a logo", "a sticker", "a map", "a technical drawing",
    "a blueprint", "a fresco", "an embroidery", "a tapestry",
)
MOVEMENTS = (
    "impressionism", "post-impressionism", "expressionism", "art nouveau", "art deco", "bauhaus", "cubism",
    "surrealism", "dada", "pop art", "op art", "minimalism", "abstract expressionism", "realism",
    "photorealism", "hyperrealism", "romanticism", "baroque", "renaissance", "rococo", "neoclassicism",
    "pointillism", "fauvism", "futurism", "constructivism", "ukiyo-e", "sumi-e", "folk art", "naive art",
    "street art", "graffiti", "psychedelic art", "vaporwave", "synthwave", "cyberpunk", "steampunk",
    "solarpunk", "gothic", "fantasy art", "science fiction art", "concept art", "lowbrow art",
)
FLAVORS = (
    "highly detailed", "intricate details", "sharp focus", "soft focus", "shallow depth of field", "bokeh",
    "wide angle", "telephoto", "macro", "aerial view", "symmetrical", "centered composition", "rule of thirds",
    "close-up portrait", "full body", "studio lighting", "soft lighting", "dramatic lighting", "rim lighting",
    "backlit", "volumetric lighting", "god rays", "golden hour", "blue hour", "night", "neon lights",
    "candlelight", "overcast", "foggy", "rainy", "snowy", "sunny", "vibrant colors", "muted colors",
    "pastel colors", "monochrome", "high contrast", "low contrast", "warm tones", "cool tones", "sepia",
    "film grain", "vintage", "retro", "futuristic", "minimalist", "cluttered", "cozy", "eerie", "whimsical",
    "cute", "elegant", "epic", "peaceful", "melancholic", "dreamy", "ornate", "textured", "glossy", "matte",
    "isometric", "flat colors", "cel shading", "smooth gradients", "simple background", "white background",
    "dark background", "trending on artstation", "award winning", "4k", "8k",
)
# (topic, how many of its words the prompt takes, the words); in the order they follow the caption.
TOPICS = (("medium", 1, MEDIUMS), ("movement", 1, MOVEMENTS), ("flavor", 3, FLAVORS))
