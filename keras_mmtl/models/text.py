"""Text encoders: an in-graph tokenizer and encoders from raw strings to features."""

import collections

import keras
import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text

PAD, OOV = "", "[UNK]"


def tokenize(texts, lowercase=True):
    """Splits UTF-8 strings into word and punctuation tokens, in the TF graph.

    Case folding and Unicode-script splitting come from tensorflow-text, so
    "Men's T-Shirt" and "men's t-shirt" give the same tokens in any script.

    Args:
        texts: `tf.string` tensor of shape `(batch,)`.
        lowercase: fold case first (Unicode-aware).

    Returns:
        `tf.RaggedTensor` of tokens, shape `(batch, None)`.

    Example:

    >>> tokenize(tf.constant(["Red T-Shirt"])).to_list()
    [[b'red', b't', b'-', b'shirt']]
    """
    texts = tf.convert_to_tensor(texts, tf.string)
    if lowercase:
        texts = tf_text.case_fold_utf8(texts)
    return tf_text.UnicodeScriptTokenizer().tokenize(texts)


def learn_vocabulary(texts, max_tokens=20000, min_count=1, lowercase=True):
    """The most frequent tokens of the training texts, most frequent first.

    Args:
        texts: the training texts (list or array of `str`).
        max_tokens: vocabulary size cap, not counting padding and `[UNK]`.
        min_count: keep tokens seen at least this many times.
        lowercase: as in `tokenize`.

    Returns:
        list of `str` tokens, sorted by count then alphabetically.

    Example:

    >>> learn_vocabulary(["red shirt", "blue shirt"])
    ['shirt', 'blue', 'red']
    """
    texts = [str(t) for t in texts]
    counts = collections.Counter()
    for start in range(0, len(texts), 8192):
        tokens = tokenize(tf.constant(texts[start:start + 8192]), lowercase)
        counts.update(tokens.flat_values.numpy().tolist())
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [token.decode("utf-8") for token, count in ranked[:max_tokens] if count >= min_count]


@keras.saving.register_keras_serializable(package="keras_mmtl")
class TextTokenizer(keras.layers.Layer):
    """Maps raw strings to padded token ids with a fixed vocabulary.

    Id 0 is padding, id 1 is `[UNK]` (out of vocabulary), ids from 2 are the
    vocabulary. The vocabulary is part of the layer's config, so it travels
    with a saved or exported model.

    Args:
        vocabulary: list of tokens (see `learn_vocabulary`).
        sequence_length: tokens kept per text (longer texts are cut).
        lowercase: fold case before splitting.

    Example:

    >>> tokenizer = TextTokenizer(["shirt", "red"], sequence_length=4)
    >>> tokenizer(tf.constant(["Red shirt!"])).numpy().tolist()
    [[3, 2, 1, 0]]
    """

    def __init__(self, vocabulary, sequence_length=128, lowercase=True, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary = list(vocabulary)
        self.sequence_length = int(sequence_length)
        self.lowercase = bool(lowercase)
        self.lookup = keras.layers.StringLookup(
            vocabulary=self.vocabulary, mask_token=PAD, oov_token=OOV, name="lookup")

    @property
    def vocabulary_size(self):
        """Number of ids, padding and `[UNK]` included."""
        return len(self.vocabulary) + 2

    def build(self, input_shape):
        self.lookup.build(None)

    def call(self, texts):
        tokens = tokenize(tf.reshape(texts, [-1]), self.lowercase)
        padded = tokens.to_tensor(default_value=PAD, shape=[None, self.sequence_length])
        return tf.cast(self.lookup(padded), "int32")

    def compute_output_spec(self, texts):
        return keras.KerasTensor((texts.shape[0], self.sequence_length), dtype="int32")

    def get_config(self):
        config = super().get_config()
        config.update(vocabulary=self.vocabulary, sequence_length=self.sequence_length,
                      lowercase=self.lowercase)
        return config


@keras.saving.register_keras_serializable(package="keras_mmtl")
class MaskedMeanPooling(keras.layers.Layer):
    """Mean of token embeddings over the non-padding positions (id != 0)."""

    def call(self, embeddings, token_ids):
        mask = tf.cast(tf.not_equal(token_ids, 0), embeddings.dtype)[..., None]
        total = tf.reduce_sum(embeddings * mask, axis=1)
        return total / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)

    def compute_output_shape(self, embeddings_shape, token_ids_shape):
        return (embeddings_shape[0], embeddings_shape[2])


def scratch_encoder(texts, vocabulary, *, embedding_dim=128, hidden_dim=256,
                    sequence_length=128, dropout=0.1):
    """A text branch learned from scratch: tokenizer, embeddings, masked mean, dense.

    A fastText-style bag of embeddings: fast, strong on short texts (titles,
    captions, tags), and it trains in seconds on a CPU.

    Args:
        texts: symbolic `tf.string` input of shape `(batch,)`.
        vocabulary: tokens learned from the training texts.
        embedding_dim: size of token embeddings.
        hidden_dim: size of the output features.
        sequence_length: tokens kept per text.
        dropout: dropout on the pooled embedding.

    Returns:
        symbolic features of shape `(batch, hidden_dim)`.
    """
    tokenizer = TextTokenizer(vocabulary, sequence_length, name="text_tokenizer")
    ids = tokenizer(texts)
    embedded = keras.layers.Embedding(
        tokenizer.vocabulary_size, embedding_dim, name="text_embedding")(ids)
    pooled = MaskedMeanPooling(name="text_pooling")(embedded, ids)
    pooled = keras.layers.Dropout(dropout, name="text_dropout")(pooled)
    return keras.layers.Dense(hidden_dim, activation="relu", name="text_features")(pooled)


TEXT_ENCODERS = {"scratch": scratch_encoder}


def build_text_encoder(name, texts, vocabulary, **kwargs):
    """Applies the registered text encoder `name` to the symbolic `texts` input."""
    if name not in TEXT_ENCODERS:
        raise ValueError(
            f"Unknown text encoder {name!r}. Expected one of {sorted(TEXT_ENCODERS)}. "
            f"Received: text_encoder={name!r}"
        )
    if vocabulary is None or len(vocabulary) == 0:
        raise ValueError(
            "The text encoder needs a vocabulary learned from the training texts: "
            "pass text_vocabulary=learn_vocabulary(train_texts) or use classifier_for()."
        )
    return TEXT_ENCODERS[name](texts, np.asarray(vocabulary).tolist(), **kwargs)
