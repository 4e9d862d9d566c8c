"""The safety nets and limits: dry-run review, transactions and compensation, governance (budgets,
promotion, quarantine), rate limits, the SaaS quota, alerts and metrics."""
