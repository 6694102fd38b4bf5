"""What Multi30k task 1 (Elliott et al., 2016) is and where it is published: the URL of its raw text, its
languages, its splits and the SHA-256 of each upstream file. `tformer.data.download` fetches it.

Kept outside the `tformer.data` package, whose `__init__` imports torch and sentencepiece, so that
`tformer download --help` states these defaults without loading either.
"""

MULTI30K_BASE_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
MULTI30K_LANGUAGES = ("en", "de", "fr", "cs")
# local split name -> upstream file stem
MULTI30K_SPLITS = {"train": "train", "val": "val", "test2016": "test_2016_flickr"}

# SHA-256 of the decompressed upstream files (multi30k/dataset at a3d2e0d26b56f3846f66a952536ffed4e401d05a).
MULTI30K_SHA256: dict[str, str] = {
    "test2016.cs": "45adb85f688de8407fddcbe1b36dca15d12aab868149b337e2576f2d6d2ff8d8",
    "test2016.de": "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16",
    "test2016.en": "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182",
    "test2016.fr": "cb3160d69b002bb638e66cc7612fcd56cb0af82eadc9c142dedc438afb885ef6",
    "train.cs": "2be68b38c8d586ff4f54eb13cc6e1baaaa053695b3f070d3038303a47f2268da",
    "train.de": "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72",
    "train.en": "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
    "train.fr": "5925a3c18f1587b6b54b87743106e6e8ab93618edb6f65d19eac0621f853a10d",
    "val.cs": "d53827e469b0a1ca8d57e9e26b2b64c4bc4b33f5479c7b03ae87ae5c882c3e33",
    "val.de": "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660",
    "val.en": "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
    "val.fr": "5304e444d842e962b2dda4d816b70b22a1765b15401642b7ca37a67477e708dc",
}
