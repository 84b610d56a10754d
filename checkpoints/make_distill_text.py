"""Generates the distillation corpora shipped in activeflow_jax/data/distill.txt and distill2.txt (absl flags).

Distillation must never see the evaluation text, and only package registries are reachable, so
the dense default model writes its own training text (the ActiveFlow paper's code does the same):
articles and explanations on a fixed list of topics, sampled in batches with fixed seeds
(distill/corpus.py). The training topics (sets 1 and 2) are not the calibration corpus's.

    python checkpoints/make_distill_text.py --templates_per_topic 3 --batch 37 --out activeflow_jax/data/distill.txt
    python checkpoints/make_distill_text.py --topic_set 2 --templates_per_topic 2 --batch 58 --seed 8642 \
        --out activeflow_jax/data/distill2.txt
    python checkpoints/make_distill_text.py --topic_set heldout --templates_per_topic 1 --batch 32 --seed 98765 \
        --out results/heldout.txt        # 13.6k tokens never trained on (measures memorisation)
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
flags.DEFINE_enum("topic_set", "1", ["1", "2", "heldout"],
                  "1: TOPICS in TEMPLATES (distill.txt); 2: TOPICS_2 in TEMPLATES_2 (distill2.txt); "
                  "heldout: TOPICS_HELDOUT in TEMPLATES (never trained on)")

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

# The second corpus (--topic_set 2, distill2.txt): other topics, other prompt forms, so a 300-step
# run sees each token about once (stop 15 found that stop 14's seed-1 student fitted its data: its
# sparse KL is 37% below the undistilled model's on its training text, 21% on new teacher text)
TEMPLATES_2 = [
    "Write a Wikipedia article about {}.",
    "Write a textbook chapter about {}.",
    "Write a news report about {}.",
    "Write an essay on the history and significance of {}.",
]

TOPICS_2 = [
    "a Royal Navy battleship of the First World War", "a destroyer of the Second World War", "an aircraft carrier",
    "a Spanish galleon", "a German U-boat", "a Confederate ironclad", "a clipper ship", "a hospital ship",
    "a typhoon that struck the Philippines", "a hurricane that hit Florida", "a cyclone in the Bay of Bengal",
    "a winter storm in the northeastern United States", "a flood on the Rhine", "a drought in East Africa",
    "a state highway in Michigan", "an interstate highway in Texas", "a toll road in Japan", "a mountain pass in the Alps",
    "a railway station in Germany", "a suspension bridge in Scotland", "a canal in England", "a tram network",
    "a platformer video game from the 1990s", "a role-playing video game series", "a racing video game",
    "an online strategy game", "a handheld game console", "an arcade game", "a video game soundtrack",
    "a pop single that topped the charts", "a folk song from Ireland", "a heavy metal album", "a country music singer",
    "a jazz pianist", "a symphony orchestra", "a film composer", "a music festival", "a girl group from South Korea",
    "a science fiction film", "a silent film comedian", "a war film", "a horror film franchise", "a documentary film",
    "an episode of a television drama", "a television sitcom", "a cartoon series", "a reality television show",
    "a talk show host", "a radio drama", "a stage play", "a ballet", "a comic book superhero", "a detective novel",
    "a fantasy novel series", "a poet of the Romantic era", "a Victorian novelist", "a Russian novelist",
    "a newspaper", "a literary magazine", "a children's book", "a dictionary",
    "a professional footballer", "a cricket captain", "a boxing champion", "an ice hockey team", "a rugby union club",
    "a golf tournament", "a Grand Prix driver", "a marathon runner", "a swimming champion", "a chess grandmaster",
    "a baseball stadium", "a college football rivalry", "the Winter Olympics", "a cycling race in Italy",
    "a species of frog", "a species of eagle", "a species of beetle", "a kind of orchid", "a species of salmon",
    "a dinosaur from the Cretaceous", "a prehistoric shark", "a species of bat", "a kind of cactus", "a parrot",
    "jellyfish", "a species of deer", "tigers", "the giant panda", "hummingbirds", "spiders", "seaweed", "mosses",
    "a bishop in medieval England", "a Roman emperor", "a Byzantine general", "a Chinese poet", "a Mughal emperor",
    "an Egyptian pharaoh", "a Viking king", "a Scottish clan", "a French queen", "a Portuguese explorer",
    "a president of the United States", "a prime minister of Australia", "a mayor of a large city", "a trade union leader",
    "a civil rights activist", "a labour strike", "an election in India", "a referendum", "a constitution",
    "a battle of the American Revolution", "a siege in the Middle Ages", "a naval battle in the Pacific",
    "a rebellion in China", "a crusade", "a colonial war in Africa", "a peace treaty", "a military academy",
    "a castle in Wales", "a cathedral in France", "a mosque in Spain", "a temple in Cambodia", "a palace in Russia",
    "a museum in London", "an opera house", "a lighthouse in Maine", "a zoo", "a botanical garden",
    "a town in Ohio", "a village in Bavaria", "a county in Ireland", "a province of Canada", "a city in Brazil",
    "an island in the Caribbean", "a river in Siberia", "a lake in Africa", "a volcano in Chile", "a desert in China",
    "a mountain in New Zealand", "a forest in Poland", "a bay in California", "a cave system", "a waterfall",
    "mathematics in ancient India", "prime numbers", "probability", "geometry", "calculus", "statistics",
    "chemistry of water", "metals", "plastics", "nuclear fusion", "gravity", "sound waves", "magnetism in the Earth",
    "weather forecasting", "climate change", "rainbows", "the Sun", "the Milky Way", "asteroids", "Venus",
    "satellites", "rockets", "the space shuttle", "a moon of Saturn", "telescopes in space",
    "the immune response to infection", "sleep", "the skeleton", "vision", "nutrition", "diabetes", "surgery",
    "hospitals", "public health", "malaria", "smallpox", "dentistry", "genetics", "stem cells",
    "the history of money", "taxes", "a large bank", "an airline", "a car manufacturer", "a steel company",
    "a department store", "a railway company", "a shipping company", "the oil industry", "coal mining",
    "a fashion designer", "architecture in Chicago", "a modern painter", "sculpture in ancient Rome", "pottery",
    "stained glass", "tapestries", "cartography", "clocks", "the compass", "paper", "glassmaking", "textiles",
    "a university in the United States", "a boarding school", "a public library", "an encyclopedia",
    "a religious order", "a saint", "a monastery in Tibet", "Hinduism", "Judaism", "Shinto", "a pilgrimage route",
    "a national holiday", "a carnival", "folk dances", "cooking in Mexico", "cheese", "rice", "the tomato",
    "beer brewing", "the olive", "sugar", "salt", "a famous restaurant", "street food",
]

# Held out (--topic_set heldout): never trained on; KL on this text against KL on the training
# text measures how much a student memorised. Some topics are also calibration.txt's, in other words.
TOPICS_HELDOUT = [
    "the Thirty Years' War", "the Aztec Empire", "Joan of Arc", "Johannes Kepler", "jazz in New Orleans",
    "the Olympic Games", "volcanoes in Indonesia", "the Amazon rainforest", "the city of Istanbul", "the Eiffel Tower",
    "coral reefs", "penguins", "the periodic table", "black holes", "the printing press", "the railway in Britain",
    "tea in China", "the French Revolution", "the Silk Road", "Sanskrit", "Islamic architecture", "the violin",
    "the Mongol invasions of Japan", "glaciers", "the Sahara", "honey bees", "steam engines", "Saturn",
    "the Renaissance in Florence", "the samurai", "the Black Death", "the Mississippi River",
]


def main(argv):
    del argv
    import activeflow_jax as af
    from activeflow_jax.distill.corpus import generate_batch

    engine = af.Engine.load(FLAGS.store or af.fetch_default_model())
    # topic i in templates i, i+1, ... (mod 4): every topic several times, in different forms
    templates, topics = {"1": (TEMPLATES, TOPICS), "2": (TEMPLATES_2, TOPICS_2),
                         "heldout": (TEMPLATES, TOPICS_HELDOUT)}[FLAGS.topic_set]
    prompts = [templates[(i + j) % len(templates)].format(t)
               for j in range(FLAGS.templates_per_topic) for i, t in enumerate(topics)]
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
