"""Generates the distillation corpus shipped in activeflow_jax/data/distill.txt (absl flags).

Distillation must never see the evaluation text, and only package registries are reachable, so
the dense default model writes its own training text (the ActiveFlow paper's code does the same):
articles and explanations on a fixed list of topics, sampled in batches with fixed seeds
(distill/corpus.py). Topics are disjoint from the calibration corpus's.

    python checkpoints/make_distill_text.py --out activeflow_jax/data/distill.txt
"""

from __future__ import annotations

import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "activeflow_jax/data/distill.txt", "output text file")
flags.DEFINE_string("store", None, "store of the teacher (default: the default model)")
flags.DEFINE_integer("max_new_tokens", 448, "max new tokens per text")
flags.DEFINE_integer("batch", 32, "sequences generated together")
flags.DEFINE_integer("limit", 0, "use only the first N prompts (0: all)")
flags.DEFINE_float("temperature", 0.8, "sampling temperature")
flags.DEFINE_float("min_p", 0.05, "min-p sampling cut (relative to the most likely token)")
flags.DEFINE_integer("seed", 4321, "base seed")
flags.DEFINE_integer("templates_per_topic", 4, "how many of the templates each topic is written in (1-4)")

TEMPLATES = [
    "Write an encyclopedia article about {}.",
    "Write a detailed history of {}.",
    "Explain {} to a university student, with examples.",
    "Write a long magazine feature about {}.",
]

TOPICS = [
    "the Hundred Years' War", "the Battle of Hastings", "the Spanish Armada", "the War of 1812",
    "the Battle of Gettysburg", "the Crimean War", "the Napoleonic Wars", "the Korean War",
    "the Vikings", "the Ottoman Empire", "the Inca Empire", "the Hanseatic League", "the Qing dynasty",
    "the Austro-Hungarian Empire", "the Roman Republic", "ancient Greece", "the Persian Empire",
    "the Holy Roman Empire", "the British East India Company", "the Meiji Restoration",
    "Queen Victoria", "Napoleon Bonaparte", "Abraham Lincoln", "Marie Curie", "Isaac Newton",
    "Charles Darwin", "Leonardo da Vinci", "Ludwig van Beethoven", "Nelson Mandela", "Albert Einstein",
    "Ada Lovelace", "Genghis Khan", "Cleopatra", "Galileo Galilei", "Florence Nightingale",
    "Mahatma Gandhi", "Johann Sebastian Bach", "Winston Churchill", "Frida Kahlo", "Alan Turing",
    "a rock band's debut album", "the history of hip hop", "opera in Italy", "the electric guitar",
    "film noir", "the history of animation", "Broadway musicals", "video game consoles",
    "the history of the novel", "Greek mythology", "Norse mythology", "the Arthurian legends",
    "a professional baseball season", "the FIFA World Cup", "the Tour de France", "cricket in India",
    "the history of basketball", "Formula One racing", "tennis at Wimbledon", "the Boston Marathon",
    "tropical cyclones in the Pacific", "earthquakes in Japan", "the Dust Bowl", "the Little Ice Age",
    "the water cycle", "ocean currents", "tornadoes", "the ozone layer", "deserts of Australia",
    "the Great Lakes", "the Alps", "the Andes", "the Danube", "the Yangtze River", "Iceland",
    "the Galápagos Islands", "Madagascar", "the Arctic Ocean", "Lake Baikal", "the Scottish Highlands",
    "the city of Rome", "the city of Paris", "New York City", "London in the Victorian era",
    "the city of Cairo", "Mumbai", "Buenos Aires", "Sydney", "the city of Kyoto", "medieval Venice",
    "a highway in the United States", "the London Underground", "the Panama Canal", "the Suez Canal",
    "the Golden Gate Bridge", "the Great Wall of China", "Gothic architecture", "skyscrapers",
    "the DNA double helix", "the cell", "the human brain", "the heart and circulation", "bacteria",
    "viruses", "antibiotics", "dinosaurs", "birds of prey", "elephants", "octopuses", "ants",
    "sharks", "wolves", "oak trees", "fungi", "the evolution of whales", "extinct mammals",
    "quantum mechanics", "the theory of relativity", "electricity and magnetism", "thermodynamics",
    "the speed of light", "nuclear power", "semiconductors", "lasers", "the telescope", "Mars",
    "Jupiter", "comets", "the Big Bang", "the International Space Station", "the Apollo program",
    "the history of computers", "programming languages", "cryptography", "artificial intelligence",
    "the telephone", "radio broadcasting", "television", "photography", "the bicycle",
    "the automobile industry", "the history of banking", "inflation", "the stock market",
    "the Great Depression", "international trade", "agriculture in the Middle Ages", "coffee",
    "chocolate", "bread baking", "the spice trade", "wine making in France", "the potato",
    "democracy in Athens", "the United Nations", "the Magna Carta", "the European Union",
    "human rights", "the abolition of slavery", "women's suffrage", "public libraries",
    "universities in the Middle Ages", "the history of writing", "the English language",
    "Latin", "the Chinese writing system", "Buddhism", "the Protestant Reformation",
    "pilgrimages", "monasteries", "the history of chess in Europe", "board games", "origami",
    "the history of the circus", "lighthouses", "submarines", "sailing ships", "the Titanic",
    "the history of aviation in wartime", "airships", "helicopters", "a small island nation",
    "a national park in Canada", "a historic university town", "a fishing village in Norway",
]


def main(argv):
    del argv
    import activeflow_jax as af
    from activeflow_jax.distill.corpus import generate_batch

    engine = af.Engine.load(FLAGS.store or af.fetch_default_model())
    # topic i in templates i, i+1, ... (mod 4): every topic several times, in different forms
    prompts = [TEMPLATES[(i + j) % len(TEMPLATES)].format(t)
               for j in range(FLAGS.templates_per_topic) for i, t in enumerate(TOPICS)]
    if FLAGS.limit:
        prompts = prompts[:FLAGS.limit]
    texts, tokens, t0 = [], 0, time.perf_counter()
    for start in range(0, len(prompts), FLAGS.batch):
        part = prompts[start:start + FLAGS.batch]
        ids = [engine.tokenizer.encode_chat(p) for p in part]
        outs = generate_batch(engine, ids, max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                              min_p=FLAGS.min_p, seed=FLAGS.seed + start)
        for prompt, out in zip(part, outs):
            texts.append(engine.tokenizer.decode(out).strip() + "\n")
            tokens += len(out)
        print(f"[{start + len(part)}/{len(prompts)}] {tokens} tokens, {tokens / (time.perf_counter() - t0):.0f} tok/s",
              flush=True)
    with open(FLAGS.out, "w", encoding="utf-8") as f:
        f.write("\n".join(texts))
    print(f"wrote {FLAGS.out}: {len(texts)} texts, {tokens} tokens in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    app.run(main)
