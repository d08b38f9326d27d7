"""Class vocabularies of the paper's datasets (SPEC §8). Facts only; see ``registry``."""
from __future__ import annotations

# SPEC §8: VOC classification names (20), in VOC order.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
# SPEC §8: VOC background words (25).
VOC_BACKGROUND = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river",
    "sea", "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean",
    "road", "rock", "street", "valley", "bridge", "sign",
)
# SPEC §8: COCO names (80) in the usual order, with the reference's VOC-style spellings.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "sofa", "pottedplant", "bed", "diningtable", "toilet", "tvmonitor", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
# SPEC §8: COCO background words (23) = the VOC list without "keyboard" and "sign".
COCO_BACKGROUND = tuple(w for w in VOC_BACKGROUND if w not in ("keyboard", "sign"))

# SPEC §8: COCO-Stuff fine ids 0..181 (official id - 1). Names as the reference spells them:
# official COCO-Stuff names except "pottedplant" and "diningtable" (checked against the
# authors' class list recorded in the golden fixtures).
182
COCO_STUFF_182 = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "pottedplant", "bed", "mirror",
    "diningtable", "window", "desk", "toilet", "door", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "blender",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush", "hair brush",
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence",
    "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill",
    "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud",
    "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad",
    "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone",
    "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
# SPEC §8: the 11 ids whose (id + 1) is unused in COCO-Stuff.
COCO_STUFF_UNUSED = tuple(i - 1 for i in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91))
# 182-index id -> 171-index id (quirk Q7), and the 171 names.
COCO_STUFF_182_TO_171 = {
    fine: i for i, fine in enumerate(f for f in range(len(COCO_STUFF_182)) if f not in COCO_STUFF_UNUSED)
}
COCO_STUFF_CLASSES = tuple(COCO_STUFF_182[f] for f in COCO_STUFF_182_TO_171)

# SPEC §6: the official COCO-Stuff coarse classes (27) and the fine-182 -> coarse-27 mapping.
COCO_STUFF_COARSE = (
    "electronic", "appliance", "food things", "furniture things", "indoor", "kitchen",
    "accessory", "animal", "outdoor", "person", "sports", "vehicle", "ceiling", "floor",
    "food stuff", "furniture stuff", "raw material", "textile", "wall", "window", "building",
    "ground", "plant", "sky", "solid", "structural", "water",
)
COCO_STUFF_182_TO_27 = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 6, 6, 6, 6, 6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5,
    5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0,
    0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4, 17, 17, 22, 20, 20,
    22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13, 22, 26,
    14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21,
    21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17,
    22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19, 19, 24,
)
# 171-index class -> coarse class.
COCO_STUFF_171_TO_27 = tuple(COCO_STUFF_182_TO_27[f] for f in COCO_STUFF_182_TO_171)
