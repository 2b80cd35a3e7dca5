"""The two state layouts as data: ``encoder`` (what the game sends) and ``seed`` (the seed
document's table), each a `table.Table` of named slots, reads and keywords; ``table`` holds
the row types. ``mltasks.state`` is the door the rest of the service uses."""
