"""Text encoders: in-graph tokenizers and encoders from raw strings to features."""

import collections
import os

import keras
import numpy as np
import tensorflow as tf

PAD, OOV = "", "[UNK]"
TEXT_BACKBONE = "text_backbone"
# A letter, number or combining mark: what words are made of; any other non-space character
# is a token by itself.
_NOT_WORD = r"([^\p{L}\p{N}\p{M}\s])"
TOKENIZERS = ("core", "unicode_script")
# The tokenizer layer's name in a classifier: where in-graph preprocessing ends.
TOKENIZER = "text_tokenizer"
WORDPIECE = "The WordPiece tokenizer of pretrained text encoders"


def import_tensorflow_text(feature):
    """The `tensorflow_text` module, imported when a feature needs it.

    tensorflow-text has no wheel on some platforms (Windows), so the package
    imports, trains and exports its default models without it.

    Args:
        feature: what needs it, for the error, e.g. `"The 'unicode_script' tokenizer"`.

    Raises:
        ImportError: when tensorflow-text is not installed, saying what to install.
    """
    try:
        import tensorflow_text as tf_text
    except ImportError as error:
        raise ImportError(
            f"{feature} needs tensorflow-text (its ops are not core TensorFlow): "
            "pip install tensorflow-text (no wheel on Windows; text_tokenizer='core' and the "
            "'scratch', 'tfidf' and 'ngrams' text encoders run without it).") from error
    return tf_text


def register_text_ops():
    """Registers tensorflow-text's ops, if it is installed, before a SavedModel is loaded.

    A graph that uses them (the `"unicode_script"` tokenizer, pretrained
    encoders' WordPiece) loads only once they are registered; one with core
    ops only (the default) loads without tensorflow-text.

    Returns:
        whether tensorflow-text's ops are registered.
    """
    try:
        import tensorflow_text  # noqa: F401  (importing it registers its ops)
    except ModuleNotFoundError as error:
        if error.name != "tensorflow_text":  # installed but broken: say so
            raise
        return False
    return True


def tokenize(texts, lowercase=True, tokenizer="core"):
    """Splits UTF-8 strings into word and punctuation tokens, in the TF graph.

    Two tokenizers give the same tokens on most text:

    - `"core"` (the default): Unicode lower-casing, then words are runs of
      letters, digits and marks (any script) and every other character is
      a token of its own. Core TensorFlow ops only (`StringLower`,
      `StaticRegexReplace`, `StringSplitV2`), so an exported model runs on
      stock TF Serving and loads with `import tensorflow` alone.
    - `"unicode_script"`: tensorflow-text's case folding and Unicode-script
      tokenizer, which also splits where the script changes (`"abc123"` is
      two tokens). Its ops (`CaseFoldUTF8`, `UnicodeScriptTokenizeWithOffsets`)
      are not core TensorFlow: a server needs the tensorflow-text ops.

    Args:
        texts: `tf.string` tensor of shape `(batch,)`.
        lowercase: fold case first (Unicode-aware).
        tokenizer: `"core"` or `"unicode_script"`.

    Returns:
        `tf.RaggedTensor` of tokens, shape `(batch, None)`.

    Example:

    >>> tokenize(tf.constant(["Red T-Shirt, size 42"])).to_list()
    [[b'red', b't', b'-', b'shirt', b',', b'size', b'42']]
    >>> tokenize(tf.constant(["Red T-Shirt"]), tokenizer="unicode_script").to_list()
    [[b'red', b't', b'-', b'shirt']]
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"Unknown tokenizer {tokenizer!r}. Expected one of {TOKENIZERS}. "
                         f"Received: tokenizer={tokenizer!r}")
    texts = tf.convert_to_tensor(texts, tf.string)
    if tokenizer == "unicode_script":
        tf_text = import_tensorflow_text("The 'unicode_script' tokenizer")
        if lowercase:
            texts = tf_text.case_fold_utf8(texts)
        return tf_text.UnicodeScriptTokenizer().tokenize(texts)
    if lowercase:
        texts = tf.strings.lower(texts, encoding="utf-8")
    return tf.strings.split(tf.strings.regex_replace(texts, _NOT_WORD, r" \1 "))


def learn_vocabulary(texts, max_tokens=20000, min_count=1, lowercase=True, tokenizer="core"):
    """The most frequent tokens of the training texts, most frequent first.

    Args:
        texts: the training texts (list or array of `str`).
        max_tokens: vocabulary size cap, not counting padding and `[UNK]`.
        min_count: keep tokens seen at least this many times.
        lowercase: as in `tokenize`.
        tokenizer: as in `tokenize`; the model's `TextTokenizer` must use the same.

    Returns:
        list of `str` tokens, sorted by count then alphabetically.

    Example:

    >>> learn_vocabulary(["red shirt", "blue shirt"])
    ['shirt', 'blue', 'red']
    """
    texts = [str(t) for t in texts]
    counts = collections.Counter()
    for start in range(0, len(texts), 8192):
        tokens = tokenize(tf.constant(texts[start:start + 8192]), lowercase, tokenizer)
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
        tokenizer: `"core"` (core TensorFlow ops only, the default) or
            `"unicode_script"` (tensorflow-text ops); see `tokenize`. A
            saved model from before this option loads as `"unicode_script"`,
            the tokenizer it was trained with.

    Example:

    >>> tokenizer = TextTokenizer(["shirt", "red"], sequence_length=4)
    >>> tokenizer(tf.constant(["Red shirt!"])).numpy().tolist()
    [[3, 2, 1, 0]]
    """

    def __init__(self, vocabulary, sequence_length=128, lowercase=True, tokenizer="core",
                 **kwargs):
        super().__init__(**kwargs)
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"Unknown tokenizer {tokenizer!r}. Expected one of {TOKENIZERS}. "
                             f"Received: tokenizer={tokenizer!r}")
        if tokenizer == "unicode_script":  # refused when built, not when first called
            import_tensorflow_text("The 'unicode_script' tokenizer")
        self.vocabulary = list(vocabulary)
        self.sequence_length = int(sequence_length)
        self.lowercase = bool(lowercase)
        self.tokenizer = tokenizer
        # Strings and ragged tensors: XLA compiles neither, so a model holding this layer
        # runs without XLA (`jit_compile="auto"` resolves to False).
        self.supports_jit = False
        self.lookup = keras.layers.StringLookup(
            vocabulary=self.vocabulary, mask_token=PAD, oov_token=OOV, name="lookup")

    @property
    def vocabulary_size(self):
        """Number of ids, padding and `[UNK]` included."""
        return len(self.vocabulary) + 2

    def build(self, input_shape):
        self.lookup.build(None)

    def call(self, texts):
        tokens = tokenize(tf.reshape(texts, [-1]), self.lowercase, self.tokenizer)
        padded = tokens.to_tensor(default_value=PAD, shape=[None, self.sequence_length])
        return tf.cast(self.lookup(padded), "int32")

    def compute_output_spec(self, texts):
        return keras.KerasTensor((texts.shape[0], self.sequence_length), dtype="int32")

    def get_config(self):
        config = super().get_config()
        config.update(vocabulary=self.vocabulary, sequence_length=self.sequence_length,
                      lowercase=self.lowercase, tokenizer=self.tokenizer)
        return config

    @classmethod
    def from_config(cls, config):
        # Saved before the option existed: trained with tensorflow-text's tokenizer.
        return cls(**{"tokenizer": "unicode_script", **config})


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
                    sequence_length=128, dropout=0.1, tokenizer="core"):
    """A text branch learned from scratch: tokenizer, embeddings, masked mean, dense.

    A fastText-style bag of embeddings: fast, strong on short texts (titles,
    captions, tags), and it trains in seconds on a CPU.

    Args:
        texts: symbolic `tf.string` inputs of shape `(batch,)`, one per text
            column; they share the encoder's layers.
        vocabulary: tokens learned from the training texts.
        embedding_dim: size of token embeddings.
        hidden_dim: size of the output features.
        sequence_length: tokens kept per text.
        dropout: dropout on the pooled embedding.
        tokenizer: `"core"` or `"unicode_script"` (see `tokenize`), as the
            vocabulary was learned with.

    Returns:
        symbolic features of shape `(batch, hidden_dim)`, one per input.
    """
    tokenizer = TextTokenizer(vocabulary, sequence_length, tokenizer=tokenizer,
                              name=TOKENIZER)
    embedding = keras.layers.Embedding(
        tokenizer.vocabulary_size, embedding_dim, name="text_embedding")
    pooling = MaskedMeanPooling(name="text_pooling")
    top = _top_layers(dropout, hidden_dim)

    def encode(text):
        ids = tokenizer(text)
        return top(pooling(embedding(ids), ids))

    return [encode(text) for text in texts]


def _top_layers(dropout, hidden_dim):
    """What every encoder ends with: dropout, then a dense layer to `hidden_dim` features."""
    dropout = keras.layers.Dropout(dropout, name="text_dropout")
    dense = keras.layers.Dense(hidden_dim, activation="relu", name="text_features")

    def top(pooled):
        return dense(dropout(pooled))

    return top


@keras.saving.register_keras_serializable(package="keras_mmtl")
class WordPieceTokenizer(keras.layers.Layer):
    """BERT-style WordPiece tokenization into the inputs of a keras-hub BERT backbone.

    Uses tensorflow-text's `FastBertTokenizer` (lower-casing and accent
    stripping as uncased BERT does), adds `[CLS]`/`[SEP]`, truncates to
    `sequence_length` and pads to the longest text of the batch, so a batch
    of short titles runs the encoder over a few positions, not all of
    `sequence_length`. The vocabulary is part of the config.

    Args:
        vocabulary: the WordPiece vocabulary (a BERT `vocab.txt`, one token per line).
        sequence_length: ids per text, `[CLS]` and `[SEP]` included.
        lowercase: lower-case and strip accents first (uncased models).

    Returns (when called):
        dict of int32 `token_ids`, `segment_ids` and bool `padding_mask`,
        each `(batch, length)` with `length <= sequence_length`.

    Example:

    >>> tokenizer = WordPieceTokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "red", "shoe"], 5)
    >>> tokenizer(tf.constant(["Red shoe", "shoe"]))["token_ids"].numpy().tolist()
    [[2, 4, 5, 3], [2, 5, 3, 0]]
    """

    def __init__(self, vocabulary, sequence_length=128, lowercase=True, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary = list(vocabulary)
        self.sequence_length = int(sequence_length)
        self.lowercase = bool(lowercase)
        self.supports_jit = False  # tensorflow-text's string ops: XLA cannot compile them
        index = {token: i for i, token in enumerate(self.vocabulary)}
        self.cls_id, self.sep_id, self.pad_id = (index[t] for t in ("[CLS]", "[SEP]", "[PAD]"))
        tf_text = import_tensorflow_text(WORDPIECE)
        self.tokenizer = tf_text.FastBertTokenizer(
            self.vocabulary, token_out_type=tf.int32, unknown_token="[UNK]",
            lower_case_nfd_strip_accents=self.lowercase)

    def call(self, texts):
        ids = self.tokenizer.tokenize(tf.reshape(texts, [-1]))
        ids = ids[:, : self.sequence_length - 2]
        batch = ids.nrows()
        ids = tf.concat([tf.fill([batch, 1], self.cls_id), ids,
                         tf.fill([batch, 1], self.sep_id)], axis=1)
        # Padded to the longest text of the batch: short texts cost little.
        token_ids = ids.to_tensor(default_value=self.pad_id)
        return {"token_ids": token_ids, "segment_ids": tf.zeros_like(token_ids),
                "padding_mask": tf.not_equal(token_ids, self.pad_id)}

    def compute_output_spec(self, texts):
        shape = (texts.shape[0], None)
        return {"token_ids": keras.KerasTensor(shape, dtype="int32"),
                "segment_ids": keras.KerasTensor(shape, dtype="int32"),
                "padding_mask": keras.KerasTensor(shape, dtype="bool")}

    def get_config(self):
        config = super().get_config()
        config.update(vocabulary=self.vocabulary, sequence_length=self.sequence_length,
                      lowercase=self.lowercase)
        return config


def pretrained_encoder(texts, preset, *, sequence_length=128, hidden_dim=256, dropout=0.1):
    """A pretrained BERT-family encoder from keras-hub, frozen, mean-pooled, projected.

    The tokenizer runs in the graph (`WordPieceTokenizer`, with the preset's
    vocabulary); the sentence embedding is the mean of the token outputs
    over non-padding positions (as sentence-transformers models are trained),
    followed by dropout and a trainable dense layer, as in the other encoders.

    Args:
        texts: symbolic `tf.string` inputs of shape `(batch,)`, one per text
            column; they share the encoder.
        preset: a keras-hub preset name (e.g. `"bert_tiny_en_uncased"`,
            downloaded once) or a local model directory (keras-hub or Hugging
            Face format, e.g. the all-MiniLM-L6-v2 folder).
        sequence_length: ids per text, at most.
        hidden_dim: size of the output features.
        dropout: dropout on the sentence embedding.

    Returns:
        symbolic features of shape `(batch, hidden_dim)`, one per input.
    """
    try:
        import keras_hub
    except ImportError:
        raise ImportError(
            "Pretrained text encoders need keras-hub: pip install 'keras-mmtl[hub]'.") from None
    import_tensorflow_text(WORDPIECE)  # before a download that could not be used
    try:
        backbone = keras_hub.models.Backbone.from_preset(preset)
        vocabulary = keras_hub.tokenizers.Tokenizer.from_preset(preset).get_vocabulary()
    except Exception as error:  # keras-hub raises several kinds for an unknown preset
        raise ValueError(
            f"Unknown text encoder {preset!r}. Expected 'scratch', a keras-hub preset name or "
            f"a local model directory. Received: text_encoder={preset!r} ({error})"
        ) from error
    backbone.trainable = False
    backbone.name = TEXT_BACKBONE
    tokenizer = WordPieceTokenizer(vocabulary, sequence_length, name=TOKENIZER)
    pooling = MaskedMeanPooling(name="text_pooling")
    top = _top_layers(dropout, hidden_dim)

    def encode(text):
        inputs = tokenizer(text)
        # training=False: the frozen encoder's dropout stays off, as in its cached features.
        outputs = backbone({name: inputs[name] for name in backbone.input}, training=False)
        return top(pooling(outputs["sequence_output"], inputs["token_ids"]))

    return [encode(text) for text in texts]


def learn_tfidf(texts, max_tokens=20000, **vectorizer_options):
    """The vocabulary and inverse document frequencies of the training texts, for `"tfidf"`.

    Texts are lower-cased, stripped of punctuation and split on whitespace, as
    `keras.layers.TextVectorization` does by default. The weight of a token
    is `log(1 + n_texts / (1 + n_texts_with_token))`, Keras' TF-IDF weight.

    Args:
        texts: the training texts.
        max_tokens: vocabulary size cap (the most frequent tokens are kept).
        **vectorizer_options: more `TextVectorization` arguments, such as
            `ngrams=2` or `split="character"`.

    Returns:
        dict token -> IDF weight, most frequent token first.

    Example:

    >>> {token: round(w, 2) for token, w in learn_tfidf(["red shirt", "blue shirt"]).items()}
    {'shirt': 0.51, 'red': 0.69, 'blue': 0.69}
    """
    texts = tf.constant([str(t) for t in texts])
    counter = keras.layers.TextVectorization(max_tokens=max_tokens + 1, output_mode="multi_hot",
                                             **vectorizer_options)
    counter.adapt(texts, batch_size=1024)
    frequencies = sum(np.asarray(counter(texts[start:start + 1024])).sum(axis=0)
                      for start in range(0, len(texts), 1024))
    weights = np.log(1 + len(texts) / (1 + frequencies))
    # Index 0 is the out-of-vocabulary token.
    return dict(zip(map(str, counter.get_vocabulary()[1:]), weights[1:].tolist()))


# The "ngrams" encoder's two bags: word uni- and bigrams, and character 3- to 5-grams
# (across word boundaries, spaces included), as TextVectorization arguments.
NGRAMS = {"words": {"ngrams": 2}, "characters": {"split": "character", "ngrams": (3, 4, 5)}}
# The layers that count each bag's n-grams in a classifier (sparse counts, nothing to train).
NGRAM_LAYERS = tuple(f"text_{bag}" for bag in NGRAMS)


def learn_ngrams(texts, max_tokens=20000):
    """The vocabularies and IDF weights of the `"ngrams"` encoder's two bags.

    Args:
        texts: the training texts.
        max_tokens: size cap of each bag's vocabulary.

    Returns:
        dict bag (`"words"`, `"characters"`) -> dict n-gram -> IDF weight.

    Example:

    >>> bags = learn_ngrams(["red shirt", "blue shirt"])
    >>> sorted(bags), "red shirt" in bags["words"], "s h i" in bags["characters"]
    (['characters', 'words'], True, True)
    """
    return {bag: learn_tfidf(texts, max_tokens, **options) for bag, options in NGRAMS.items()}


@keras.saving.register_keras_serializable(package="keras_mmtl")
class NgramProjection(keras.layers.Layer):
    """Bags of n-gram counts as unit-length TF-IDF vectors, through a dense layer, sparsely.

    `relu(concat_b(unit(count_b * idf_b)) @ kernel + bias)`: a `Dense` layer
    on the concatenated TF-IDF vectors, each bag scaled to unit length (as
    scikit-learn's `TfidfVectorizer` does), computed from the n-grams a text
    holds only. A title has about a hundred of the 30,000 n-grams: the
    product gathers those kernel rows, so its gradient is sparse and
    `LayerwiseAdam` updates only those rows. Out-of-vocabulary n-grams
    (index 0 of a bag) weigh the bag's mean IDF.

    Args:
        units: size of the output features.
        idf_weights: per bag, the IDF weight of each vocabulary entry (index
            1 on); `None` when loading a saved layer (its weights hold them).
        dropout: in training, the rate of n-grams dropped from each text.
        seed: seed of the dropout.

    Call arguments:
        bags: a list of `tf.SparseTensor` counts `(batch, vocabulary size + 1)`,
            as `keras.layers.TextVectorization(output_mode="count", sparse=True)`
            gives them; dense counts are made sparse first (Keras builds a
            model under `tf.distribute` from dense placeholders).

    Example:

    >>> import tensorflow as tf
    >>> layer = NgramProjection(2, idf_weights=[[1.0, 2.0]], kernel_initializer="ones")
    >>> counts = tf.sparse.from_dense(tf.constant([[0.0, 3.0, 0.0], [0.0, 1.0, 1.0]]))
    >>> [[round(float(v), 3) for v in row] for row in layer([counts])]  # [1, 0], [1, 2] / 2.236
    [[1.0, 1.0], [1.342, 1.342]]
    """

    def __init__(self, units, idf_weights=None, dropout=0.0, seed=None,
                 kernel_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.units, self.dropout, self.seed = int(units), float(dropout), seed
        self.idf_weights = idf_weights
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        self.sizes = [int(shape[-1]) for shape in input_shape]
        self.idf = []
        for i, size in enumerate(self.sizes):
            initial = "zeros"
            if self.idf_weights is not None:
                weights = [float(w) for w in self.idf_weights[i]]
                if len(weights) + 1 != size:
                    raise ValueError(f"Bag {i} has {size - 1} n-grams and {len(weights)} IDF "
                                     "weights; give one weight per vocabulary entry.")
                initial = keras.initializers.Constant([float(np.mean(weights))] + weights)
            self.idf.append(self.add_weight(shape=(size,), initializer=initial,
                                            trainable=False, name=f"idf_{i}"))
        self.kernel = self.add_weight(shape=(sum(self.sizes), self.units), name="kernel",
                                      initializer=self.kernel_initializer)
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")

    def call(self, bags, training=None):
        bags = [bag if isinstance(bag, tf.SparseTensor) else tf.sparse.from_dense(bag)
                for bag in bags]
        batch = tf.cast(bags[0].dense_shape[0], "int32")
        rows, ids, values, offset = [], [], [], 0
        for bag, idf, size in zip(bags, self.idf, self.sizes):
            row, column = bag.indices[:, 0], bag.indices[:, 1]
            value = tf.cast(bag.values, "float32") * tf.gather(tf.cast(idf, "float32"), column)
            norm = tf.sqrt(tf.math.unsorted_segment_sum(value * value, row, batch))
            rows.append(row)
            ids.append(column + offset)
            values.append(value / tf.maximum(tf.gather(norm, row), 1e-12))
            offset += size
        rows, ids, values = (tf.concat(parts, 0) for parts in (rows, ids, values))
        if training and self.dropout:
            keep = keras.random.uniform(tf.shape(values), seed=self.seed_generator) >= self.dropout
            values = tf.where(keep, values / (1 - self.dropout), 0.0)
        kernel = tf.cast(self.kernel, "float32")
        product = tf.math.unsorted_segment_sum(tf.gather(kernel, ids) * values[:, None],
                                               rows, batch)
        return tf.cast(tf.nn.relu(product + tf.cast(self.bias, "float32")), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.units)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "dropout": self.dropout,
                "seed": self.seed,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer)}


def ngram_encoder(texts, vocabulary, *, hidden_dim=256, dropout=0.1, sequence_length=None):
    """TF-IDF of word 1-2 grams and character 3-5 grams, then a dense layer.

    What a strong linear text classifier reads, in the graph with core
    TensorFlow ops: each bag is a `TextVectorization` counting n-grams
    (sparse), and `NgramProjection` weighs them by IDF, scales each bag to
    unit length (as scikit-learn's `TfidfVectorizer` does) and projects
    them, reading only the n-grams present. Character n-grams read word
    parts, brands, sizes and misspellings that a word vocabulary misses: on
    short titles they beat word embeddings learned from scratch.

    Args:
        texts: symbolic `tf.string` inputs of shape `(batch,)`, one per text
            column; they share the encoder's layers.
        vocabulary: dict bag -> dict n-gram -> IDF weight (`learn_ngrams`).
        hidden_dim: size of the output features.
        dropout: in training, the rate of n-grams dropped.
        sequence_length: unused (a bag has no length); accepted so every
            encoder takes the builder's arguments.

    Returns:
        symbolic features of shape `(batch, hidden_dim)`, one per input.
    """
    if not isinstance(vocabulary, dict) or set(vocabulary) != set(NGRAMS):
        raise ValueError("The 'ngrams' text encoder needs text_vocabulary=learn_ngrams("
                         f"train_texts) (a dict with keys {sorted(NGRAMS)}).")
    bags = [keras.layers.TextVectorization(output_mode="count", sparse=True,
                                           vocabulary=list(vocabulary[bag]), name=name, **options)
            for name, (bag, options) in zip(NGRAM_LAYERS, NGRAMS.items())]
    project = NgramProjection(hidden_dim, [list(vocabulary[bag].values()) for bag in NGRAMS],
                              dropout=dropout, name="text_features")
    return [project([vectorizer(text) for vectorizer in bags]) for text in texts]


def tfidf_encoder(texts, vocabulary, *, hidden_dim=256, dropout=0.1, sequence_length=None):
    """The tutorials' cheapest text branch: a TF-IDF bag of words and a dense layer.

    Args:
        texts: symbolic `tf.string` inputs of shape `(batch,)`, one per text
            column; they share the vectorizer and the dense layer.
        vocabulary: dict token -> IDF weight (`learn_tfidf`).
        hidden_dim: size of the output features.
        dropout: dropout on the TF-IDF vector.
        sequence_length: unused (a bag of words has no length); accepted so
            every encoder takes the builder's arguments.

    Returns:
        symbolic features of shape `(batch, hidden_dim)`, one per input.
    """
    if not isinstance(vocabulary, dict):
        raise ValueError("The 'tfidf' text encoder needs text_vocabulary=learn_tfidf(train_texts) "
                         "(a dict of token -> IDF weight).")
    vectorizer = keras.layers.TextVectorization(
        output_mode="tf_idf", vocabulary=list(vocabulary),
        idf_weights=list(vocabulary.values()), name="text_vectorizer")
    top = _top_layers(dropout, hidden_dim)
    return [top(vectorizer(text)) for text in texts]


# name -> (encoder, what learns its vocabulary from the training texts)
TEXT_ENCODERS = {
    "scratch": (scratch_encoder, learn_vocabulary),
    "tfidf": (tfidf_encoder, learn_tfidf),
    "ngrams": (ngram_encoder, learn_ngrams),
}


def needs_vocabulary(name):
    """Whether the text encoder `name` learns its vocabulary from the training texts."""
    return isinstance(name, str) and name in TEXT_ENCODERS


def vocabulary_learner(name):
    """The function that learns text encoder `name`'s vocabulary: `f(texts, max_tokens)`."""
    return TEXT_ENCODERS[name][1]


def check_text_encoder(name):
    """Returns `name` if it names a text encoder that can be built, else raises a `ValueError`.

    A registered encoder (`"ngrams"`, `"scratch"`, `"tfidf"`), a local model
    directory, a `kaggle://` or `hf://` handle, or a keras-hub preset name
    (checked against keras-hub's list, without downloading it). Used to
    refuse a typo before any data is read.

    Example:

    >>> check_text_encoder("ngrams")
    'ngrams'
    >>> check_text_encoder("ngramz")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Unknown text encoder 'ngramz'...
    """
    if name in TEXT_ENCODERS or os.path.isdir(name) or "://" in name:
        return name
    try:
        import keras_hub
    except ImportError:
        keras_hub = None
    if keras_hub is not None and name in keras_hub.models.Backbone.presets:
        return name
    hub = ("a keras-hub preset name" if keras_hub is not None else
           "a keras-hub preset name (needs pip install 'keras-mmtl[hub]')")
    raise ValueError(f"Unknown text encoder {name!r}: expected one of {sorted(TEXT_ENCODERS)}, "
                     f"an existing local model folder, or {hub}.")


def build_text_encoder(name, texts, vocabulary, **kwargs):
    """Applies text encoder `name` to the symbolic `texts` inputs (a list); returns their features.

    `name` is a registered encoder (`"scratch"`, `"tfidf"`) or a keras-hub
    preset name or local directory (see `pretrained_encoder`). Several inputs
    (text columns) share one encoder.
    """
    if not needs_vocabulary(name):
        return pretrained_encoder(texts, os.fspath(name), **kwargs)
    if vocabulary is None or len(vocabulary) == 0:
        raise ValueError(
            f"The {name!r} text encoder needs a vocabulary learned from the training texts: pass "
            f"text_vocabulary={vocabulary_learner(name).__name__}(train_texts) or use "
            "build_classifier_for()."
        )
    if not isinstance(vocabulary, dict):
        vocabulary = np.asarray(vocabulary).tolist()
    return TEXT_ENCODERS[name][0](texts, vocabulary, **kwargs)


def unfreeze_text_layers(model, num_layers):
    """Makes the top `num_layers` transformer layers of the pretrained text encoder trainable.

    The layers below them and the embeddings stay frozen. The encoder keeps
    running with `training=False` (no dropout), as when it was frozen.

    Args:
        model: a classifier holding a `"text_backbone"` (see `pretrained_encoder`).
        num_layers: number of top transformer layers to train; `"all"` (or
            more than the encoder has) for all.

    Returns:
        names of the unfrozen layers.
    """
    backbone = model.get_layer(TEXT_BACKBONE)
    layers = list(backbone.transformer_layers)
    count = len(layers) if num_layers == "all" else int(num_layers)
    if count < 0:
        raise ValueError(f"num_layers must be >= 0 or 'all'. Received: num_layers={num_layers!r}")
    top = layers[len(layers) - min(count, len(layers)):] if count > 0 else []
    backbone.trainable = bool(top)
    for layer in backbone.layers:
        layer.trainable = any(layer is chosen for chosen in top)
    return [layer.name for layer in top]
