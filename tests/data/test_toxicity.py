import pytest

from lmforge.data.toxicity import HFClassifierScorer, LexiconScorer, ToxicityConfig, make_scorer
from lmforge.errors import LmforgeError


def test_lexicon_scores_insults_and_threats_not_code():
    scorer = LexiconScorer()
    toxic, threat, code, mild = scorer.score([
        "you are an idiot and a moron, shut up",
        "I'll kill you",
        "def kill(pid):\n    os.kill(pid, signal.SIGTERM)  # terminate the worker\n",
        "damn, " + "this long and otherwise perfectly civil report covers the annual budget " * 20,
    ])
    assert toxic > 0.9 and threat > 0.9
    assert code == 0.0
    assert 0 < mild < 0.5  # one mild word in a long text stays under the default threshold


def test_lexicon_file_extends_the_builtin_terms(tmp_path):
    path = tmp_path / "extra.tsv"
    path.write_text("# custom terms\nfrobnicator\t3\nzorp\n")
    scorer = make_scorer(ToxicityConfig(lexicon_path=str(path)))
    assert scorer.score(["what a frobnicator"])[0] > 0.9
    assert scorer.score(["zorp"])[0] > scorer.score(["hello"])[0] == 0.0
    with pytest.raises(LmforgeError, match="not found"):
        make_scorer(ToxicityConfig(lexicon_path=str(tmp_path / "missing.tsv")))


def test_hf_scorer_needs_a_model_directory(tmp_path):
    with pytest.raises(LmforgeError, match="local HF model directory"):
        HFClassifierScorer(tmp_path)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A tiny randomly initialised BERT classifier with a word-level tokenizer, saved locally,
    biased so that its 'toxic' label wins on every input."""
    transformers = pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny-toxic")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "you", "are", "nice", "idiot"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]")
    fast.save_pretrained(path)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                                     num_labels=2, id2label={0: "non-toxic", 1: "toxic"},
                                     label2id={"non-toxic": 0, "toxic": 1})
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([-5.0, 5.0]))
    model.save_pretrained(path)
    return path


def test_hf_scorer_reads_the_toxic_label_of_a_local_model(tiny_classifier):
    scorer = HFClassifierScorer(tiny_classifier, batch_size=2)
    assert scorer.index == 1  # 'toxic', not 'non-toxic'
    scores = scorer.score(["you are nice", "you are an idiot", "unknown words only"])
    assert len(scores) == 3 and all(s > 0.9 for s in scores)
    assert HFClassifierScorer(tiny_classifier, label="non-toxic").score(["you are nice"])[0] < 0.1
    with pytest.raises(LmforgeError, match="not in the model's labels"):
        HFClassifierScorer(tiny_classifier, label="spam")
