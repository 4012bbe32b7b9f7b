"""A tiny byte-level BPE tokenizer trained in memory (no network): every string maps to ids, no UNK.

Import the fixture into a test module: ``from tests.tokenizer_fixtures import tiny_tokenizer``.
"""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PARAGRAPHS = [
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, "
    "seemed to unite some of the best blessings of existence.",
    "She was the youngest of the two daughters of a most affectionate, indulgent father; and had, "
    "in consequence of her sister's marriage, been mistress of his house from a very early period.",
    "The real evils, indeed, of Emma's situation were the power of having rather too much her own way, "
    "and a disposition to think a little too well of herself.",
    "Sorrow came, a gentle sorrow, but not at all in the shape of any disagreeable consciousness.",
]


def build_tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Byte-level BPE with GPT-2's pre-tokenizer; EOS "</s>" (id 0), model_max_length 64 so long
    inputs would trigger transformers' too-long warning."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(PARAGRAPHS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", model_max_length=64)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()
