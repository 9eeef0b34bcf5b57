"""What networks learn: task data and scoring (``task``), DS1 device machines (``machines``),
the DS2 command trigger (``command_trigger``), DS3 random automata (``automata``) and the
sequence tasks built from them (``sequences``)."""
