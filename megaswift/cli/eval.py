"""`megaswift eval`: score a model (local folder or OpenAI-compatible URL) on MCQ CSV and QA jsonl sets and on
lm-eval-harness tasks, all in one JSON and one table."""
import argparse
import sys

from megaswift.cli.startup import start_up_imports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megaswift.serve.model_args import add_model_arguments

    add_model_arguments(parser, required=False)
    parser.add_argument("--adapter", default=None, help="which of --adapters to evaluate (default: the first one)")
    parser.add_argument("--url", default=None, help="an OpenAI-compatible server instead of --model, e.g. "
                                                    "http://127.0.0.1:8000/v1 (a `megaswift deploy`)")
    parser.add_argument("--api-key", default=None, help="the server's API key (--url)")
    parser.add_argument("--served-model", default=None, help="model name at --url (default: the first listed)")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated: *.csv (multiple choice), *.jsonl (QA), and lm-eval-harness tasks: "
                             "task YAML files (relative data_files are read next to the YAML) or task names "
                             "(needs the `eval` extra)")
    parser.add_argument("--output", default="eval_results.json")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="QA answer length")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task")
    harness = parser.add_argument_group("lm-eval-harness tasks")
    harness.add_argument("--lm-eval-include", nargs="+", default=[], metavar="DIR",
                         help="folders of lm-eval task YAMLs whose task names --tasks may use")
    harness.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: examples in each prompt")
    harness.add_argument("--apply-chat-template", action="store_true",
                         help="lm-eval: render its prompts with the model's chat template (as a chat model was "
                              "trained); required with --lm-eval-api chat-completions")
    harness.add_argument("--lm-eval-api", choices=["completions", "chat-completions"], default="completions",
                         help="with --url: lm-eval's local-completions (log-likelihoods and generation; the "
                              "server must return prompt logprobs with echo, as megaswift deploy and vLLM do) or "
                              "local-chat-completions (generation tasks only)")


def run(args: argparse.Namespace) -> int:
    with start_up_imports(args):
        from megaswift.data.sft.formats import SampleFormatError
        from megaswift.serve import harness
        from megaswift.serve.evaluate import LocalModel, RemoteModel, evaluate, format_table, write_results
        from megaswift.serve.loading import ModelLoadError
        from megaswift.serve.model_args import load_from_args

    tasks = [t for t in args.tasks.split(",") if t]
    custom = [t for t in tasks if harness.is_custom_task(t)]
    lm_eval_tasks = [t for t in tasks if not harness.is_custom_task(t)]
    try:
        if (args.model is None) == (args.url is None):
            raise ValueError("give exactly one of --model DIR (a local model) and --url URL (a server)")
        if lm_eval_tasks and args.url and args.lm_eval_api == "chat-completions" and not args.apply_chat_template:
            raise ValueError("--lm-eval-api chat-completions sends chats: add --apply-chat-template")
        if lm_eval_tasks:  # before the model loads: a missing package or task fails at once
            harness.require_lm_eval(lm_eval_tasks)
            specs, manager = harness.resolve_tasks(lm_eval_tasks, args.lm_eval_include)
        if args.url:
            backend, about = RemoteModel(args.url, args.served_model, args.api_key), {"url": args.url}
            about["model"] = backend.model
        else:
            loaded = load_from_args(args)
            adapter = args.adapter or (loaded.adapters[0] if loaded.adapters else None)
            backend, about = LocalModel(loaded, adapter, args.batch_size), {"model": args.model, "adapter": adapter}
        results = evaluate(backend, custom, args.max_new_tokens, args.limit)
        if lm_eval_tasks:
            if args.url:
                lm = harness.remote_harness_model(args.url, backend.model, args.api_key, args.lm_eval_api,
                                                  args.batch_size)
                results |= harness.run_harness(lm, specs, manager, args.limit, args.num_fewshot,
                                               args.apply_chat_template)
            else:
                with harness.active_adapter(loaded, adapter):
                    results |= harness.run_harness(harness.local_harness_model(loaded, args.batch_size), specs,
                                                   manager, args.limit, args.num_fewshot, args.apply_chat_template)
    except (ModelLoadError, SampleFormatError, ValueError, FileNotFoundError) as err:
        print(f"megaswift eval: error: {err}", file=sys.stderr)
        return 1
    write_results(results, args.output, about)
    print(format_table(results))
    print(f"megaswift eval: results in {args.output}")
    return 0
