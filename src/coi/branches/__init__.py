"""Branch sessions: each session on a repository copy of its own, on branch ``coi/<NAME>``,
reviewed and merged from the host.

Owns: where the copies live and how they are made (``copies``), git as coi runs it
(``git``), and reading, reviewing, merging and discarding a session's work (``review``).

The security rule of the package: a copy is the agent's, so nothing coi runs on the host
reads the copy's git config, runs its hooks or trusts its files. Every read of a copy
goes through a repository of coi's own (its *view*: coi's config, the copy's objects as
data), and the work reaches the host repository with a plain ``git fetch`` from that view.

Must not: print (it reports through the ``Log`` it is given), talk to Incus, or run git in
a copy once a container has had it.
"""
