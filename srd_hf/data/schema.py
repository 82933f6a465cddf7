"""The one row schema every caption dataset of srd-hf uses (synthetic, COCO, Flickr30k).

* ``image``: a ``datasets.Image`` (decoded to PIL on access)
* ``image_id``: a string unique within the dataset
* ``captions``: one or more reference captions
* ``objects``: the generator's ground truth (shape, colour, size, position) for the
  embedded world; an empty list for real photos, whose objects are not annotated
"""

from datasets import Features, Image, Sequence, Value

OBJECT_FEATURE = {
    "shape": Value("string"),
    "colour": Value("string"),
    "size": Value("string"),
    "position": Value("string"),
}

CAPTION_FEATURES = Features(
    {
        "image": Image(),
        "image_id": Value("string"),
        "captions": Sequence(Value("string")),
        "objects": [OBJECT_FEATURE],
    }
)

SPLITS = ("train", "validation", "test")
