{{/*
The pod template shared by Master and Worker replicas. The operator injects MASTER_ADDR, PET_NNODES,
PET_NODE_RANK, ... into the `pytorch` container (not into init containers), and torchrun reads the
PET_* variables itself, so one template serves every node.
*/}}
{{- define "userloop.podTemplate" -}}
metadata:
  labels:
    {{- include "userloop.labels" . | nindent 4 }}
  annotations:
    {{- $ann := dict
      "kubectl.kubernetes.io/default-container" "pytorch"
      "sidecar.istio.io/inject" "false" }}
    {{- toYaml (merge $ann (deepCopy .Values.annotations)) | nindent 4 }}
spec:
  serviceAccountName: {{ .Values.serviceAccount.name }}
  # The trainer never calls the API server.
  automountServiceAccountToken: false
  # Service links add an env var per Service in the namespace; nothing here reads them.
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ int .Values.terminationGracePeriodSeconds }}
  securityContext:
    runAsNonRoot: true
    runAsUser: {{ int .Values.runAsUser }}
    runAsGroup: {{ int .Values.runAsUser }}
    fsGroup: {{ int .Values.runAsUser }}
    fsGroupChangePolicy: OnRootMismatch
    seccompProfile:
      type: RuntimeDefault
  {{- with .Values.priorityClass }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $gpu := gt (int (include "userloop.podGpus" .)) 0 }}
  {{- if or $gpu .Values.tolerations }}
  tolerations:
    {{- if $gpu }}
    # GPU nodes are usually tainted; the device plugin does not add this toleration for us.
    - key: nvidia.com/gpu
      operator: Exists
      effect: NoSchedule
    {{- end }}
    {{- with .Values.tolerations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- if .Values.sglang.enabled }}
  initContainers:
    # A native sidecar (Kubernetes >= 1.29): restartPolicy Always makes this init container run beside
    # the trainer, gate it through the startup probe, and not keep the pod alive once the trainer exits,
    # so the PyTorchJob can still succeed. A plain second container would keep the pod Running forever.
    - name: sglang
      image: {{ .Values.sglang.image }}
      imagePullPolicy: {{ .Values.imagePullPolicy }}
      restartPolicy: Always
      command: [python3, -m, sglang.launch_server]
      args:
        {{- toYaml .Values.sglang.args | nindent 8 }}
      ports:
        - name: sglang
          containerPort: {{ int .Values.sglang.port }}
          protocol: TCP
      env:
        - name: HF_HOME
          value: {{ printf "%s/.cache/huggingface" .Values.pvc.mountPath }}
      resources:
        {{- include "userloop.resources" .Values.sglang | nindent 8 }}
      # /health_generate answers 503 until the model is loaded and a 1-token generation works; model
      # download, load and CUDA-graph capture take minutes, so allow startupFailureThreshold x 10 s.
      startupProbe:
        httpGet:
          path: /health_generate
          port: sglang
        periodSeconds: 10
        timeoutSeconds: 10
        failureThreshold: {{ int .Values.sglang.startupFailureThreshold }}
      readinessProbe:
        httpGet:
          path: /health
          port: sglang
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 3
      livenessProbe:
        httpGet:
          path: /health
          port: sglang
        periodSeconds: 30
        timeoutSeconds: 10
        failureThreshold: 5
      # The documented exception to a read-only root (values.yaml `sglang`, docs/launcher.md): SGLang,
      # flashinfer and triton JIT-compile kernels and write caches in places that differ between releases
      # (under $HOME, /tmp and some package directories), which cannot be listed for a pinned volume set.
      securityContext:
        {{- include "userloop.containerSecurityContext" (dict "readOnlyRootFilesystem" false) | nindent 8 }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        - name: weights
          mountPath: /weights
        - name: output
          mountPath: {{ .Values.pvc.mountPath }}
  {{- end }}
  containers:
    # The operator's webhook requires the training container to be named `pytorch`.
    - name: pytorch
      image: {{ .Values.image }}
      imagePullPolicy: {{ .Values.imagePullPolicy }}
      command: [torchrun]
      # Node count, rank and rendezvous come from the PET_* variables the operator sets.
      args: [-m, trainer, --config, /etc/userloop/config.yaml]
      env:
        - name: USERLOOP_RUN_NAME
          value: {{ include "userloop.runName" . }}
        # litellm downloads a price list at import unless told not to, and stalls without internet.
        - name: LITELLM_LOCAL_MODEL_COST_MAP
          value: "True"
        - name: HF_HOME
          value: {{ printf "%s/.cache/huggingface" .Values.pvc.mountPath }}
        # The root filesystem is read-only: everything else that writes caches is pointed at the `tmp`
        # emptyDir (per pod, lost on restart: kernels are recompiled, which is cheap next to a download).
        - name: HOME
          value: /tmp
        - name: XDG_CACHE_HOME
          value: /tmp/.cache
        - name: TRITON_CACHE_DIR
          value: /tmp/.cache/triton
        - name: TORCHINDUCTOR_CACHE_DIR
          value: /tmp/.cache/torchinductor
        - name: MPLCONFIGDIR
          value: /tmp/.cache/matplotlib
        {{- if .Values.sglang.enabled }}
        # rollout.sglang.url and .weights_dir default to these (resolved when the trainer starts).
        - name: USERLOOP_SGLANG_URL
          value: {{ printf "http://127.0.0.1:%d" (int .Values.sglang.port) }}
        - name: USERLOOP_WEIGHTS_DIR
          value: /weights
        {{- end }}
        {{- if .Values.apiKeySecret.name }}
        # Only a reference: the key itself never appears in a manifest, a ConfigMap or a log.
        - name: {{ .Values.apiKeySecret.env }}
          valueFrom:
            secretKeyRef:
              name: {{ .Values.apiKeySecret.name }}
              key: {{ .Values.apiKeySecret.key }}
        {{- end }}
      resources:
        {{- include "userloop.resources" .Values.trainer | nindent 8 }}
      # Read-only root: the trainer writes only to the PVC, /tmp, /dev/shm and /weights.
      securityContext:
        {{- include "userloop.containerSecurityContext" (dict "readOnlyRootFilesystem" true) | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/userloop
          readOnly: true
        - name: tmp
          mountPath: /tmp
        - name: dshm
          mountPath: /dev/shm
        {{- if .Values.sglang.enabled }}
        - name: weights
          mountPath: /weights
        {{- end }}
        - name: output
          mountPath: {{ .Values.pvc.mountPath }}
  volumes:
    - name: config
      configMap:
        name: {{ include "userloop.configMapName" . }}
    # The trainer's only scratch space besides the PVC (root is read-only): /tmp and the kernel caches.
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmpSize }}
    # NCCL and data loaders need more than the container runtime's 64 MiB default /dev/shm.
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.shmSize }}
    {{- if .Values.sglang.enabled }}
    # Trainer and sidecar hold disjoint GPUs (no CUDA IPC): new weights and LoRA adapters go through RAM.
    - name: weights
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.weightsSize }}
    {{- end }}
    - name: output
      persistentVolumeClaim:
        claimName: {{ .Values.pvc.name }}
{{- end -}}
