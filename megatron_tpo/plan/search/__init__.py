"""Which layouts: every trainer layout ranked, or one given layout judged with its
smallest fixes."""
