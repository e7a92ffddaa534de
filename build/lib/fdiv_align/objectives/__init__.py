"""The mathematics, with no model in sight: divergences (f, f′, pseudo-rewards), the estimators (log Ẑ,
importance-sampled divergences, ESS, baselines), the f-DPG surrogate loss, the preference losses (f-DPO,
Bradley–Terry) and quasi-rejection sampling. Imports nothing of the package but itself."""
