"""What an audit produces: the report and its JSON, the table, markdown/model card, plots, baseline, trend."""
