"""The built-in zoo: a tiny base LM and four tiny MLLMs trained here from a seed, with no downloads
(docs/zoo.md), the commonality benchmark they are tested on, and the story command."""
