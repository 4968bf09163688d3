"""Several named adapters of one base (`LoraBank` trees): building, routing and selecting them
(`verbs`, the public `lorax.adapters`) and weighted combinations (`weighted`)."""
