"""Online methods: networks trained together from scratch teach each other; one plain network is deployed.

``dml`` (Deep Mutual Learning), ``one`` (On-the-Fly Native Ensemble), ``okddip`` (diverse
peers with a leader) and ``ekd`` (evolutionary teacher, our reconstruction); ``common``
holds their base class, the multi-branch network and the ensemble file. docs/online.md
explains every choice.
"""
