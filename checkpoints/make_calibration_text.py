"""Generates the calibration text shipped in activeflow_jax/data/calibration.txt (absl flags).

Calibration (sparsity thresholds) and distillation must never see the evaluation text. Only
package registries are reachable here, so the calibration corpus is written by the dense default
model itself: encyclopedic articles on a fixed list of topics, sampled with a fixed seed. This
is the teacher-generated data the ActiveFlow paper also distills on.

    python checkpoints/make_calibration_text.py --out activeflow_jax/data/calibration.txt
"""

from __future__ import annotations

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "activeflow_jax/data/calibration.txt", "output text file")
flags.DEFINE_string("store", None, "store of the teacher (default: the default model)")
flags.DEFINE_integer("tokens_per_topic", 320, "max new tokens per article")
flags.DEFINE_float("temperature", 0.8, "sampling temperature")
flags.DEFINE_integer("seed", 1234, "base seed")

TOPICS = [
    "the history of the Roman Empire", "photosynthesis", "the French Revolution", "volcanoes",
    "the Great Barrier Reef", "the invention of the printing press", "black holes", "the Amazon rainforest",
    "the game of chess", "jazz music", "the human immune system", "the Industrial Revolution",
    "ancient Egypt", "plate tectonics", "the Olympic Games", "the history of aviation",
    "honey bees", "the Renaissance", "climate of Antarctica", "the Silk Road", "electric cars",
    "the Moon landing of 1969", "the city of Tokyo", "the Mississippi River", "William Shakespeare",
    "the periodic table", "the history of football (soccer)", "coral reefs", "the Byzantine Empire",
    "the theory of evolution", "the internet", "the Sahara Desert", "classical music in Vienna",
    "the American Civil War", "the solar system", "tea cultivation in India", "the Eiffel Tower",
    "medieval castles", "the Mongol Empire", "vaccines", "the Ming dynasty", "hurricanes",
    "the history of mathematics", "whales", "the Himalayas", "the steam engine", "impressionist painting",
    "the Cold War", "rice farming", "the city of Istanbul", "glaciers", "the Beatles", "the Nile river",
    "the history of medicine", "railways in the 19th century", "the Aztec civilization",
    "a small village football club in England", "a 19th-century British warship", "a Baroque cathedral",
    "a hurricane season in the Atlantic",
]


def main(argv):
    del argv
    import activeflow_jax as af

    engine = af.Engine.load(FLAGS.store or af.fetch_default_model())
    articles = []
    for i, topic in enumerate(TOPICS):
        text = engine.generate(f"Write an encyclopedia article about {topic}.", chat=True,
                               max_new_tokens=FLAGS.tokens_per_topic, temperature=FLAGS.temperature,
                               top_p=0.95, seed=FLAGS.seed + i)
        articles.append(f" = {topic[0].upper() + topic[1:]} = \n\n{text.strip()}\n")
        print(f"[{i + 1}/{len(TOPICS)}] {topic}: {len(text)} chars", flush=True)
    with open(FLAGS.out, "w", encoding="utf-8") as f:
        f.write("\n".join(articles))


if __name__ == "__main__":
    app.run(main)
